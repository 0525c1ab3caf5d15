"""Turns the logits of the rows that sample into next tokens, vectorised over the batch.

Order: penalties -> min_tokens masking -> token controls (allowed_token_ids, bad_words, logit_bias, custom
processors; logits_controls.py) -> temperature -> top-k/top-p -> min-p -> sample. Greedy
rows take the argmax of the penalised logits. Logprobs are those of the raw model distribution. A request with
a seed draws its noise from its own generator, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from llmctl.engine.logits_controls import SampleRow, apply_logits_controls, rows_with_controls
from llmctl.ops import Ops, reference
from llmctl.structured_output.request_grammar import GrammarBitmask, apply_token_bitmask


@dataclass
class RowLogprobs:
    sampled_logprob: float
    sampled_rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[RowLogprobs | None]


def apply_penalties(logits: torch.Tensor, requests: Sequence[SampleRow]) -> torch.Tensor:
    n, vocab = logits.shape
    device = logits.device
    rows = [i for i, r in enumerate(requests) if r.sampling_params.needs_penalties]
    if not rows:
        return logits
    out_counts = torch.zeros((len(rows), vocab), dtype=logits.dtype, device=device)
    seen = torch.zeros((len(rows), vocab), dtype=torch.bool, device=device)
    rep, freq, pres = [], [], []
    for j, i in enumerate(rows):
        r = requests[i]
        sp = r.sampling_params
        out_ids = [t for t in r.output_token_ids if t < vocab]
        if out_ids:
            ids = torch.tensor(out_ids, device=device)
            out_counts[j].index_add_(0, ids, torch.ones(len(out_ids), dtype=logits.dtype, device=device))
        prompt_ids = [t for t in r.prompt_token_ids if t < vocab]
        if prompt_ids:
            seen[j, torch.tensor(prompt_ids, device=device)] = True
        rep.append(sp.repetition_penalty)
        freq.append(sp.frequency_penalty)
        pres.append(sp.presence_penalty)
    idx = torch.tensor(rows, device=device)
    sub = logits[idx]
    rep_t = torch.tensor(rep, dtype=logits.dtype, device=device).unsqueeze(1)
    seen |= out_counts > 0
    penalised = torch.where(sub > 0, sub / rep_t, sub * rep_t)
    sub = torch.where(seen, penalised, sub)
    sub = sub - torch.tensor(freq, dtype=logits.dtype, device=device).unsqueeze(1) * out_counts
    sub = sub - torch.tensor(pres, dtype=logits.dtype, device=device).unsqueeze(1) * (out_counts > 0).to(logits.dtype)
    logits[idx] = sub
    return logits


class Sampler:
    def __init__(self, ops: Ops, seed: int = 0) -> None:
        self.ops = ops
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: Sequence[SampleRow],
                 grammar_bitmask: GrammarBitmask | None = None) -> SamplerOutput:
        params = [r.sampling_params for r in requests]
        controls = rows_with_controls(requests)
        if not controls and all(p.greedy and not p.needs_penalties and not p.min_tokens for p in params):
            # the common offline case: no float32 copy of the logits unless logprobs ask for one
            masked = logits if grammar_bitmask is None else apply_token_bitmask(logits, grammar_bitmask)
            next_ids = self.ops.greedy_sample(masked)
            return SamplerOutput(next_ids.tolist(), self._logprobs(logits, params, next_ids))
        raw = logits.float()
        # structured output: only what the grammar allows (logprobs stay those of the raw distribution)
        masked = raw if grammar_bitmask is None else apply_token_bitmask(raw, grammar_bitmask)
        logits = self.process(masked, requests, controls)
        greedy = [p.greedy for p in params]
        if all(greedy):
            next_ids = logits.argmax(dim=-1)
        else:
            next_ids = self._sample_random(logits, requests, greedy)
        token_ids = next_ids.tolist()
        return SamplerOutput(token_ids, self._logprobs(raw, params, next_ids))

    def process(self, logits: torch.Tensor, rows: Sequence[SampleRow], controls: list[int]) -> torch.Tensor:
        """The float32 logits after the steps that depend on the request's history: penalties, min_tokens
        masking, then the token controls (see logits_controls). Returns a copy when anything changes, so the
        caller's tensor stays the raw distribution for logprobs."""
        params = [r.sampling_params for r in rows]
        if any(p.needs_penalties or p.min_tokens for p in params) or controls:
            logits = logits.clone()
        logits = apply_penalties(logits, rows)
        for i, r in enumerate(rows):
            sp = r.sampling_params
            if sp.min_tokens and len(r.output_token_ids) < sp.min_tokens:
                banned = [t for t in (*r.eos_token_ids, *sp.stop_token_ids) if t < logits.shape[1]]
                if banned:
                    logits[i, banned] = float("-inf")
        if controls:
            logits = apply_logits_controls(logits, rows, controls)
        return logits

    def warp(self, logits: torch.Tensor, rows: Sequence[SampleRow], greedy: list[bool]) -> torch.Tensor:
        """Temperature, then top-k/top-p and min-p: the logits whose softmax is the distribution sampled from
        (greedy rows keep temperature 1 here; callers take their argmax instead)."""
        params = [r.sampling_params for r in rows]
        device = logits.device
        temps = torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)], device=device)
        scaled = logits / temps.unsqueeze(1)
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            top_k = torch.tensor([p.top_k for p in params], device=device)
            top_p = torch.tensor([p.top_p for p in params], device=device, dtype=torch.float32)
            scaled = self.ops.apply_top_k_top_p(scaled, top_k, top_p)
        if any(p.min_p > 0 for p in params):
            scaled = self.ops.apply_min_p(scaled, torch.tensor([p.min_p for p in params], device=device))
        return scaled

    def uniforms(self, rows: Sequence[SampleRow], device: torch.device) -> torch.Tensor:
        """One U[0, 1) draw per row, from the row's own generator when its request has a seed."""
        u = torch.empty(len(rows), dtype=torch.float32)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if unseeded:
            u[unseeded] = torch.rand(len(unseeded), generator=self.generator)
        for i, r in enumerate(rows):
            if r.generator is not None:
                u[i] = torch.rand(1, generator=r.generator)
        return u.to(device)

    def draw(self, weights: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
        """One token per row, drawn with probability proportional to ``weights`` (``reference.inverse_cdf``).

        Why inverse CDF and not an exponential race (argmax of p / E, E ~ Exp(1)): the race needs a random number
        per vocabulary entry, and torch draws those on one thread with a log each, which made the noise the
        largest item of a sampled decode step on the CPU (rows x vocabulary draws; docs/performance.md). This
        takes one draw per row and one running sum."""
        return reference.inverse_cdf(weights, self.uniforms(rows, weights.device))

    def _sample_random(self, logits: torch.Tensor, requests: Sequence[SampleRow], greedy: list[bool]
                       ) -> torch.Tensor:
        device = logits.device
        params = [r.sampling_params for r in requests]
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0 for p in params):
            probs = self.warp(logits, requests, greedy).softmax(dim=-1, dtype=torch.float32)
            sampled = self.draw(probs, requests)
        else:  # temperature alone: the platform's draw (the same distribution, no tensor per step)
            temps = torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)], device=device)
            sampled = self.ops.sample_softmax(logits, temps, self.uniforms(requests, device))
        if any(greedy):
            g = torch.tensor(greedy, device=device)
            sampled = torch.where(g, logits.argmax(dim=-1), sampled)
        return sampled

    def _logprobs(self, raw: torch.Tensor, params: list, next_ids: torch.Tensor) -> list[RowLogprobs | None]:
        return row_logprobs(self.ops, raw, params, next_ids)


def row_logprobs(ops: Ops, raw: torch.Tensor, params: list, next_ids: torch.Tensor) -> list[RowLogprobs | None]:
    """The logprobs each row's request asks for (``ops.sampled_logprobs``), None for the others."""
    want = [p.logprobs for p in params]
    if all(w is None for w in want):
        return [None] * len(params)
    rows = [i for i, w in enumerate(want) if w is not None]
    idx = torch.tensor(rows, device=raw.device)
    x = raw[idx].float() if len(rows) < raw.shape[0] else raw.float()
    k = max(want[i] for i in rows)
    sampled_lp, ranks, top_vals, top_ids = ops.sampled_logprobs(x, next_ids[idx], k)
    out: list[RowLogprobs | None] = [None] * len(params)
    sampled_l, ranks_l, vals_l, ids_l = sampled_lp.tolist(), ranks.tolist(), top_vals.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        n = want[i]
        out[i] = RowLogprobs(sampled_l[j], ranks_l[j], ids_l[j][:n], vals_l[j][:n])
    return out


# Prompt positions whose logits exist at once: 256 x a 49k vocabulary x float32 (plus the log-softmax copy) is
# ~100 MiB, where a whole 8k-token chunk took GiBs.
PROMPT_LOGPROBS_SLICE_ROWS = 256


def prompt_logprobs_in_slices(hidden: torch.Tensor, compute_logits: Callable[[torch.Tensor], torch.Tensor],
                              targets: torch.Tensor, k: int,
                              slice_rows: int = PROMPT_LOGPROBS_SLICE_ROWS) -> list[RowLogprobs]:
    """``prompt_logprobs_rows`` over ``compute_logits(hidden)``, a slice of rows at a time to bound memory."""
    out: list[RowLogprobs] = []
    for start in range(0, hidden.shape[0], slice_rows):
        logits = compute_logits(hidden[start:start + slice_rows])
        out.extend(prompt_logprobs_rows(logits, targets[start:start + slice_rows], k))
        del logits
    return out


def prompt_logprobs_rows(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[RowLogprobs]:
    """Logprobs of each actual next prompt token (``targets``) under ``logits``, plus the top ``k``."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, targets.unsqueeze(1)).squeeze(1)
    ranks = (lp > chosen.unsqueeze(1)).sum(dim=1) + 1
    top_vals, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
    return [RowLogprobs(c, r, i, v) for c, r, i, v in
            zip(chosen.tolist(), ranks.tolist(), top_ids.tolist(), top_vals.tolist())]
