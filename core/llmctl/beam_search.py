"""Beam search on top of the engine, as vLLM v1 builds it: every step asks the engine for one greedy token of
every live beam with the top ``2 * beam_width`` logprobs, and beams that share a prefix share its KV blocks
through the prefix cache (nothing in the scheduler knows about beams).

Scoring follows transformers' ``generate(num_beams=..., do_sample=False)`` with its default
``early_stopping=False``: a beam's score is its summed logprob divided by ``generated_len ** length_penalty``
(EOS counted); a beam ending in EOS is kept only if it ranks among the ``beam_width`` best candidates of its
step; the search stops once ``beam_width`` beams have finished and the best running beam, scored at its current
length, cannot beat the worst of them, or at ``max_tokens``. docs/decoding.md maps this onto vLLM and
transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from llmctl.outputs import PositionLogprobs
from llmctl.sampling_params import MAX_LOGPROBS, SamplingParams

# Each step ranks 2 * beam_width candidates per beam from the engine's top logprobs, which stop at MAX_LOGPROBS.
MAX_BEAM_WIDTH = MAX_LOGPROBS // 2


@dataclass
class BeamSearchParams:
    """vLLM's fields. ``temperature`` exists for compatibility: beam search here is deterministic (0 only)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        for name, lo, hi in (("beam_width", 1, MAX_BEAM_WIDTH), ("max_tokens", 1, None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: must be an integer, got {value!r}")
            if value < lo or (hi is not None and value > hi):
                raise ValueError(f"{name}: must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}")
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
            raise ValueError(f"length_penalty: must be a finite number, got {lp!r}")
        if self.temperature != 0.0:
            raise ValueError(f"temperature: beam search is deterministic here; only 0 is supported, got "
                             f"{self.temperature}")


@dataclass
class BeamSearchSequence:
    """``tokens`` is the whole sequence, prompt included (as in vLLM); ``text`` is filled at the end."""

    tokens: list[int]
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]


def beam_score(cum_logprob: float, generated_len: int, length_penalty: float) -> float:
    return cum_logprob / (max(generated_len, 1) ** length_penalty)


class BeamSearchInstance:
    """The search over one prompt. ``pending()`` gives the beams to extend; ``advance()`` takes, per beam, the
    top logprobs of its next position and keeps the best ``beam_width`` continuations."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: tuple[int, ...],
                 max_model_len: int) -> None:
        self.params = params
        self.eos = set() if params.ignore_eos else set(eos_token_ids)
        self.n_prompt = len(prompt_token_ids)
        self.max_new = min(params.max_tokens, max_model_len - self.n_prompt)
        self.beams = [BeamSearchSequence(list(prompt_token_ids), num_prompt_tokens=self.n_prompt)]
        self.finished: list[tuple[float, BeamSearchSequence]] = []
        self.done = self.max_new <= 0

    def pending(self) -> list[BeamSearchSequence]:
        return [] if self.done else self.beams

    def _score(self, beam: BeamSearchSequence) -> float:
        return beam_score(beam.cum_logprob, len(beam.tokens) - self.n_prompt, self.params.length_penalty)

    def _add_finished(self, beam: BeamSearchSequence) -> None:
        self.finished.append((self._score(beam), beam))
        self.finished.sort(key=lambda sb: -sb[0])
        del self.finished[self.params.beam_width:]

    def advance(self, top_logprobs: list[PositionLogprobs]) -> None:
        width = self.params.beam_width
        candidates: list[tuple[float, int, int]] = []  # (cum logprob, beam index, token)
        for b, (beam, lps) in enumerate(zip(self.beams, top_logprobs, strict=True)):
            for tok, lp in lps.items():
                candidates.append((beam.cum_logprob + lp.logprob, b, tok))
        # The 2 * width best continuations over all beams, best first (ties: lower beam, then lower token id).
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        candidates = candidates[:2 * width]
        gen_len = len(self.beams[0].tokens) - self.n_prompt + 1
        last_step = gen_len >= self.max_new
        running: list[BeamSearchSequence] = []
        for rank, (cum, b, tok) in enumerate(candidates):
            parent = self.beams[b]
            beam = BeamSearchSequence(parent.tokens + [tok], parent.logprobs + [top_logprobs[b]], cum,
                                      num_prompt_tokens=self.n_prompt)
            if tok in self.eos or last_step:
                # Only the width best candidates of a step may finish; the others are fallbacks for the running
                # set (an EOS among them is dropped), as in transformers.
                if rank < width:
                    beam.finish_reason = "stop" if tok in self.eos else "length"
                    self._add_finished(beam)
            elif len(running) < width:
                running.append(beam)
        if last_step:
            self.done = True
            return
        self.beams = running
        if not running:
            self.done = True
        elif len(self.finished) >= width:
            best_running = max(b.cum_logprob for b in running) / (gen_len ** self.params.length_penalty)
            if best_running <= self.finished[-1][0]:
                self.done = True

    def result(self) -> list[BeamSearchSequence]:
        if not self.done:
            raise RuntimeError("beam search still running")
        return [beam for _, beam in self.finished]


def step_sampling_params(params: BeamSearchParams) -> SamplingParams:
    """One greedy token per beam, with enough logprobs to rank ``2 * beam_width`` continuations."""
    return SamplingParams(temperature=0.0, max_tokens=1, logprobs=2 * params.beam_width, ignore_eos=True,
                          detokenize=False)


def check_beam_search(params: Any, max_logprobs: int) -> None:
    if not isinstance(params, BeamSearchParams):
        raise ValueError(f"params: expected BeamSearchParams, got {type(params).__name__}")
    if 2 * params.beam_width > max_logprobs:
        raise ValueError(f"beam_width: at most {max_logprobs // 2} (the engine's max_logprobs {max_logprobs} must "
                         f"cover 2 * beam_width candidates), got {params.beam_width}")


def check_not_encoder_decoder(engine: Any) -> None:
    """Beams run as one-token requests whose prompt is the beam so far; an encoder-decoder model would read that
    as a new encoder input, so it is refused. ``engine``: an ``LLMEngine`` or an ``AsyncLLM``."""
    processor = getattr(engine, "input_processor", None) or getattr(getattr(engine, "engine", None),
                                                                    "input_processor", None)
    if getattr(processor, "encoder_decoder", None) is not None:
        raise ValueError("use_beam_search: not supported with encoder-decoder models")


async def async_beam_search(engine: Any, prompt_token_ids: list[int], params: BeamSearchParams,
                            eos_token_ids: tuple[int, ...], max_model_len: int, request_id: str
                            ) -> list[BeamSearchSequence]:
    """The same search driven through ``AsyncLLM.generate``: each step's beams run as concurrent requests."""
    import asyncio

    check_not_encoder_decoder(engine)
    inst = BeamSearchInstance(prompt_token_ids, params, eos_token_ids, max_model_len)
    step_params = step_sampling_params(params)

    async def one(beam: BeamSearchSequence, rid: str) -> PositionLogprobs:
        final = None
        async for out in engine.generate({"prompt_token_ids": beam.tokens}, step_params, rid):
            final = out
        if final is None or final.error or not final.outputs[0].logprobs:
            raise RuntimeError(f"beam search step failed: {getattr(final, 'error', None) or 'no output'}")
        return final.outputs[0].logprobs[0]

    step = 0
    while inst.pending():
        beams = inst.pending()
        tops = await asyncio.gather(*(one(b, f"{request_id}-beam{step}-{i}") for i, b in enumerate(beams)))
        inst.advance(list(tops))
        step += 1
    return inst.result()
