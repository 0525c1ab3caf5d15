"""Verifies draft tokens against the target model's logits at every draft position.

The proposers here are deterministic given the context (prompt lookup; a draft model's argmax), so the draft
distribution q is one-hot on the proposed token. Standard speculative sampling then reads: accept draft token
``d`` with probability ``p(d)`` (p = the target's distribution after penalties, controls, temperature, top-k/p
and min-p, exactly as the plain sampler computes it); on rejection draw from ``p`` with ``d`` removed
(renormalised); when every draft is accepted, draw one bonus token from the distribution after the last one.
Each emitted token is then distributed exactly as the plain sampler would draw it. Greedy rows accept while the
draft equals the argmax and emit the argmax where they stop.

The target distribution at draft position j depends on the tokens before it (penalties, min_tokens,
bad_words, custom processors), so each position is sampled as a row that sees the request's output plus the
first j draft tokens (:class:`DraftPositionRow`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl.engine.logits_controls import rows_with_controls
from llmctl.engine.request import Request
from llmctl.engine.sampler import RowLogprobs, Sampler, row_logprobs


@dataclass
class DraftPositionRow:
    """A request as the sampler sees it at one draft position: its output so far plus ``prefix`` drafts."""

    request: Request
    prefix: list[int]

    @property
    def sampling_params(self):
        return self.request.sampling_params

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.request.eos_token_ids

    @property
    def generator(self) -> torch.Generator | None:
        return self.request.generator

    @property
    def output_token_ids(self) -> list[int]:
        return self.request.output_token_ids + self.prefix


@dataclass
class VerifiedTokens:
    """Per request: the tokens to append (accepted drafts, then one sampled token) and their logprobs."""

    token_ids: list[list[int]]
    logprobs: list[list[RowLogprobs] | None]
    num_draft_tokens: int
    num_accepted_tokens: int


class RejectionSampler:
    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def __call__(self, logits: torch.Tensor, requests: list[Request], drafts: list[list[int]]) -> VerifiedTokens:
        """``logits`` holds ``len(drafts[i]) + 1`` consecutive rows per request, in request order."""
        rows: list[DraftPositionRow] = []
        starts: list[int] = []
        for req, draft in zip(requests, drafts, strict=True):
            starts.append(len(rows))
            rows.extend(DraftPositionRow(req, draft[:j]) for j in range(len(draft) + 1))
        raw = logits.float()
        processed = self.sampler.process(raw, rows, rows_with_controls(rows))
        greedy_rows = [r.sampling_params.greedy for r in rows]
        argmax = processed.argmax(dim=-1).tolist()
        accept_draws, choice = self._random_draws(processed, rows, greedy_rows, starts, drafts)

        out_ids: list[list[int]] = []
        emitted_rows: list[int] = []
        num_draft = num_accepted = 0
        for i, (req, draft) in enumerate(zip(requests, drafts, strict=True)):
            s = starts[i]
            greedy = req.sampling_params.greedy
            tokens: list[int] = []
            for j, d in enumerate(draft):
                ok = argmax[s + j] == d if greedy else accept_draws[s + j]
                if not ok:
                    break
                tokens.append(d)
            j = len(tokens)
            tokens.append(argmax[s + j] if greedy else choice[s + j])
            emitted_rows.extend(range(s, s + j + 1))
            num_draft += len(draft)
            num_accepted += j
            out_ids.append(tokens)
        return VerifiedTokens(out_ids, self._logprobs(raw, rows, emitted_rows, out_ids, starts), num_draft,
                              num_accepted)

    def _random_draws(self, processed: torch.Tensor, rows: list[DraftPositionRow], greedy: list[bool],
                      starts: list[int], drafts: list[list[int]]) -> tuple[list[bool], list[int]]:
        """For sampled rows: whether each draft is accepted (u < p(d)) and the token drawn where a row stops
        (from p without the draft, or from p itself at the bonus position)."""
        if all(greedy):
            return [], []
        device = processed.device
        probs = self.sampler.warp(processed, rows, greedy).softmax(dim=-1, dtype=torch.float32)
        draft_pos, draft_ids = [], []
        for s, draft in zip(starts, drafts, strict=True):
            draft_pos.extend(range(s, s + len(draft)))
            draft_ids.extend(draft)
        accepted = [False] * len(rows)
        residual = probs
        if draft_pos:
            pos_t = torch.tensor(draft_pos, device=device)
            ids_t = torch.tensor(draft_ids, device=device)
            p_draft = probs[pos_t, ids_t]
            uniform = self.sampler.uniforms([rows[i] for i in draft_pos], device)
            for i, ok in zip(draft_pos, (uniform < p_draft).tolist(), strict=True):
                accepted[i] = ok
            residual = probs.clone()
            residual[pos_t, ids_t] = 0.0
        choice = self.sampler.draw(residual, rows)
        # A row whose whole mass was on its draft is always accepted (u < 1), so its empty residual is never
        # used; rounding aside, keep it pointing at a token the target allows.
        choice = torch.where(residual.sum(dim=-1) > 0, choice, probs.argmax(dim=-1))
        return accepted, choice.tolist()


    def _logprobs(self, raw: torch.Tensor, rows: list[DraftPositionRow], emitted_rows: list[int],
                  out_ids: list[list[int]], starts: list[int]) -> list[list[RowLogprobs] | None]:
        if all(r.sampling_params.logprobs is None for r in rows):
            return [None] * len(out_ids)
        idx = torch.tensor(emitted_rows, device=raw.device)
        flat_ids = torch.tensor([t for toks in out_ids for t in toks], device=raw.device)
        params = [rows[i].sampling_params for i in emitted_rows]
        flat = row_logprobs(self.sampler.ops, raw[idx], params, flat_ids)
        out: list[list[RowLogprobs] | None] = []
        k = 0
        for toks in out_ids:
            part = flat[k:k + len(toks)]
            k += len(toks)
            out.append(None if part[0] is None else list(part))
        return out
