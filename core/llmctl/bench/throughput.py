"""Offline throughput: run a batch of prompts through ``llmctl.LLM`` and report requests/s and tokens/s.

Dataset: seeded random token ids (``--input-len``/``--output-len``/``--num-prompts``), a JSONL file with
one ``{"prompt": str | list[int], "output_len": int}`` per line, or ``copy`` (bench/copy_workload.py: repeat
a given text, where speculative decoding by prompt lookup pays off). Generation is greedy with ``ignore_eos`` so
every request produces exactly its ``output_len`` tokens. Model load and a short warm-up are excluded from
the timed region; load time is reported separately.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmctl.bench.common import peak_rss_mb, random_token_prompts
from llmctl.bench.copy_workload import COPY_DATASET, copy_prompts


@dataclass
class BenchRequest:
    prompt: Any  # str, or list[int] of token ids
    output_len: int


@dataclass
class ThroughputResult:
    model: str
    dtype: str
    num_prompts: int
    prompt_tokens: int
    output_tokens: int
    expected_output_tokens: int
    load_s: float
    elapsed_s: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    peak_rss_mb: float | None
    dataset: str
    engine_args: dict[str, Any] = field(default_factory=dict)
    # speculative decoding during the timed run (None without speculative_config)
    spec_acceptance_rate: float | None = None
    spec_mean_tokens_per_step: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_jsonl(path: str | Path, num_prompts: int | None = None, default_output_len: int = 128
               ) -> list[BenchRequest]:
    """Read ``{"prompt": ..., "output_len": ...}`` lines (``output_len`` optional). Blank lines are skipped."""
    reqs: list[BenchRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = row["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'prompt' field ({exc})") from None
            out_len = int(row.get("output_len", default_output_len))
            if out_len < 1:
                raise ValueError(f"{path}:{lineno}: output_len must be >= 1, got {out_len}")
            reqs.append(BenchRequest(prompt, out_len))
            if num_prompts is not None and len(reqs) >= num_prompts:
                break
    if not reqs:
        raise ValueError(f"{path}: no prompts")
    return reqs


def random_requests(num_prompts: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0
                    ) -> list[BenchRequest]:
    return [BenchRequest(p, output_len) for p in random_token_prompts(num_prompts, input_len, vocab_size, seed)]


def _engine_prompt(prompt: Any) -> Any:
    return {"prompt_token_ids": list(prompt)} if isinstance(prompt, list) else prompt


def run_requests(llm: Any, requests: list[BenchRequest]) -> tuple[float, int, int]:
    """Generate ``requests`` (greedy, ignore_eos) in one ``llm.generate`` call.

    Returns ``(elapsed_s, prompt_tokens, output_tokens)``."""
    from llmctl import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    prompts = [_engine_prompt(r.prompt) for r in requests]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    output_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return elapsed, prompt_tokens, output_tokens


def run_throughput(model: str, *, input_len: int = 128, output_len: int = 128, num_prompts: int = 64,
                   seed: int = 0, dataset: str | Path | None = None, dtype: str = "auto", warmup: bool = True,
                   llm: Any = None, **engine_kwargs: Any) -> ThroughputResult:
    """Load ``model`` (unless an ``llm`` is passed), warm up, then time one batch of ``num_prompts`` requests.

    ``engine_kwargs`` go to ``llmctl.LLM`` (e.g. ``max_num_seqs``, ``kv_cache_memory``, ``device``)."""
    load_s = 0.0
    if llm is None:
        from llmctl import LLM

        t0 = time.perf_counter()
        llm = LLM(model, dtype=dtype, **engine_kwargs)
        load_s = time.perf_counter() - t0
    vocab = int(llm.llm_engine.model_config.vocab_size)
    if dataset == COPY_DATASET:
        requests = [BenchRequest(p, output_len) for p in copy_prompts(llm.get_tokenizer(), num_prompts, input_len,
                                                                     seed)]
        name = f"copy(input_len~{input_len}, output_len={output_len}, seed={seed})"
    elif dataset is not None:
        requests = load_jsonl(dataset, num_prompts, output_len)
        name = str(dataset)
    else:
        requests = random_requests(num_prompts, input_len, output_len, vocab, seed)
        name = f"random(input_len={input_len}, output_len={output_len}, seed={seed})"
    if warmup:
        # Different prompts from the timed ones, so the prefix cache gives the timed run nothing for free.
        run_requests(llm, random_requests(2, min(input_len, 16), 4, vocab, seed + 1_000_003))
    before = llm.get_stats()
    elapsed, prompt_tokens, output_tokens = run_requests(llm, requests)
    spec = _spec_delta(before, llm.get_stats())
    model_dtype = str(getattr(llm.llm_engine.model_config, "dtype", dtype)).replace("torch.", "")
    return ThroughputResult(
        model=model, dtype=model_dtype, num_prompts=len(requests), prompt_tokens=prompt_tokens,
        output_tokens=output_tokens, expected_output_tokens=sum(r.output_len for r in requests), load_s=load_s,
        elapsed_s=elapsed, requests_per_s=len(requests) / elapsed, output_tokens_per_s=output_tokens / elapsed,
        total_tokens_per_s=(prompt_tokens + output_tokens) / elapsed, peak_rss_mb=peak_rss_mb(), dataset=name,
        engine_args={k: v for k, v in engine_kwargs.items() if isinstance(v, (int, float, str, bool, type(None)))},
        spec_acceptance_rate=spec[0], spec_mean_tokens_per_step=spec[1])


def _spec_delta(before: dict[str, Any], after: dict[str, Any]) -> tuple[float | None, float | None]:
    """Acceptance rate and tokens per verified step over the timed run only."""
    if "spec_num_draft_tokens" not in after:
        return None, None
    drafted = after["spec_num_draft_tokens"] - before["spec_num_draft_tokens"]
    accepted = after["spec_num_accepted_tokens"] - before["spec_num_accepted_tokens"]
    rows = after.get("spec_num_verify_rows", 0) - before.get("spec_num_verify_rows", 0)
    return (accepted / drafted if drafted else 0.0), ((accepted + rows) / rows if rows else 0.0)
