"""One sequence's grammar state, and the per-step bitmask for the rows that carry one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl.structured_output.backend import GrammarMatcher, bitmask_words


class RequestGrammar:
    """The matcher of one sequence. It advances with every token the sequence appends."""

    __slots__ = ("matcher", "failed", "wait_for", "_recent")

    def __init__(self, matcher: GrammarMatcher, wait_for: tuple[int, ...] = ()) -> None:
        self.matcher = matcher
        self.failed = False
        # Unconstrained until the output ends with these tokens (a reasoning model's "</think>").
        self.wait_for = wait_for
        self._recent: list[int] = []

    @property
    def waiting(self) -> bool:
        return bool(self.wait_for)

    def accept(self, token_id: int) -> bool:
        if self.wait_for:
            self._recent = (self._recent + [token_id])[-len(self.wait_for):]
            if tuple(self._recent) == self.wait_for:
                self.wait_for = ()
            return True
        ok = self.matcher.accept_token(token_id)
        self.failed = self.failed or not ok
        return ok

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_bitmask(bitmask, row)

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()

    def draft_prefix(self, draft: list[int]) -> list[int]:
        """The longest prefix of ``draft`` the grammar allows from here, ending at the latest with a token that
        ends the grammar (nothing could follow it). The matcher is left as it was."""
        if not draft or self.wait_for or self.failed or self.terminated:
            return []
        taken = 0
        for token in draft[:self.matcher.validate_tokens(draft)]:
            if not self.matcher.accept_token(token):  # pragma: no cover - validated just above
                break
            taken += 1
            if self.matcher.is_terminated():
                break
        if taken:
            self.matcher.rollback(taken)
        return draft[:taken]

    def fill_draft_positions(self, bitmask: torch.Tensor, first_row: int, draft: list[int]) -> None:
        """Rows ``first_row .. first_row + len(draft)``: the allowed tokens before each draft token and after
        the last (the bonus position). ``draft`` must be a ``draft_prefix``; the matcher is left as it was. A row
        after a token that ended the grammar keeps every token allowed: the engine drops what follows a stop."""
        for j, token in enumerate(draft):
            self.matcher.fill_bitmask(bitmask, first_row + j)
            if not self.matcher.accept_token(token):
                raise RuntimeError(f"draft token {token} is not allowed by the grammar")
        if not self.matcher.is_terminated():
            self.matcher.fill_bitmask(bitmask, first_row + len(draft))
        if draft:
            self.matcher.rollback(len(draft))


@dataclass
class GrammarBitmask:
    """``bitmask[j]`` holds the allowed tokens of sampling row ``rows[j]``."""

    bitmask: torch.Tensor
    rows: list[int]


def fill_grammar_bitmask(grammars: list[RequestGrammar | None], vocab_size: int) -> GrammarBitmask | None:
    """None when no row is constrained, so unconstrained batches pay nothing."""
    rows = [i for i, g in enumerate(grammars) if g is not None and not g.waiting and not g.terminated]
    if not rows:
        return None
    bitmask = torch.full((len(rows), bitmask_words(vocab_size)), -1, dtype=torch.int32)
    for j, i in enumerate(rows):
        grammars[i].fill(bitmask, j)  # type: ignore[union-attr]
    return GrammarBitmask(bitmask, rows)


def fill_draft_bitmask(grammars: list[RequestGrammar | None], drafts: list[list[int]],
                       vocab_size: int) -> GrammarBitmask | None:
    """The bitmask of a verification step: request ``i`` owns ``len(drafts[i]) + 1`` consecutive logits rows,
    and each of a constrained request's rows gets the grammar's state after the drafts before it."""
    rows: list[int] = []
    spans: list[tuple[RequestGrammar, int, list[int]]] = []
    start = 0
    for g, draft in zip(grammars, drafts, strict=True):
        if g is not None and not g.waiting and not g.terminated:
            spans.append((g, len(rows), draft))
            rows.extend(range(start, start + len(draft) + 1))
        start += len(draft) + 1
    if not rows:
        return None
    bitmask = torch.full((len(rows), bitmask_words(vocab_size)), -1, dtype=torch.int32)
    for g, first, draft in spans:
        g.fill_draft_positions(bitmask, first, draft)
    return GrammarBitmask(bitmask, rows)


_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_token_bitmask(logits: torch.Tensor, mask: GrammarBitmask) -> torch.Tensor:
    """A copy of ``logits`` where the grammar's disallowed tokens are -inf (in the constrained rows only)."""
    vocab = logits.shape[1]
    words = mask.bitmask.to(logits.device)
    allowed = ((words.unsqueeze(-1) >> _SHIFTS.to(logits.device)) & 1).reshape(len(mask.rows), -1)[:, :vocab]
    if allowed.shape[1] < vocab:  # logits wider than the grammar's vocabulary: the extra ids are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    rows = torch.tensor(mask.rows, device=logits.device)
    out = logits.clone()
    out[rows] = logits[rows].masked_fill(allowed == 0, float("-inf"))
    return out
