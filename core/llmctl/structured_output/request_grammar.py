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
