"""Embedding throughput: sequences/s of ``LLM.embed`` on a pooling model, and of sentence-transformers'
``encode`` on the same texts in the same run (the baseline), with the two outputs' agreement as a check that
both computed the same thing.

Texts are seeded random sentences of common words (both sides tokenize them, as real clients would send text).
Model loads and a short warm-up are excluded from the timed regions.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from llmctl.bench.common import peak_rss_mb

_WORDS = ("the of and to in is was for on that with as by at from his an were are which this be or has had not "
          "first one their its new after who they have her she two been other when there all during into school "
          "time may years more most only over city some world would where later up such used many can state about "
          "national out known university united then made").split()


def random_texts(n: int, words: int, seed: int = 0) -> list[str]:
    if n < 1 or words < 1:
        raise ValueError(f"num_prompts and input_len must be >= 1, got {n} and {words}")
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(words)) for _ in range(n)]


@dataclass
class EmbedThroughputResult:
    model: str
    dtype: str
    num_prompts: int
    words_per_prompt: int
    prompt_tokens: int
    load_s: float
    elapsed_s: float
    sequences_per_s: float
    tokens_per_s: float
    baseline: str | None = None
    baseline_elapsed_s: float | None = None
    baseline_sequences_per_s: float | None = None
    speedup: float | None = None
    min_cosine_vs_baseline: float | None = None
    peak_rss_mb: float | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_embed_throughput(model: str, *, num_prompts: int = 256, input_len: int = 32, seed: int = 0,
                         dtype: str = "auto", baseline: str | None = "sentence-transformers",
                         baseline_batch_size: int = 32, llm: Any = None,
                         **engine_kwargs: Any) -> EmbedThroughputResult:
    import torch

    load_s = 0.0
    if llm is None:
        from llmctl import LLM

        t0 = time.perf_counter()
        llm = LLM(model, dtype=dtype, runner="pooling", **engine_kwargs)
        load_s = time.perf_counter() - t0
    texts = random_texts(num_prompts, input_len, seed)
    llm.embed(random_texts(4, input_len, seed + 1))  # warm-up
    start = time.perf_counter()
    outs = llm.embed(texts)
    elapsed = time.perf_counter() - start
    ours = torch.tensor([o.outputs.embedding for o in outs])
    tokens = sum(len(o.prompt_token_ids) for o in outs)
    model_dtype = str(llm.llm_engine.model_config.dtype).replace("torch.", "")
    result = EmbedThroughputResult(
        model=model, dtype=model_dtype, num_prompts=num_prompts, words_per_prompt=input_len, prompt_tokens=tokens,
        load_s=load_s, elapsed_s=elapsed, sequences_per_s=num_prompts / elapsed, tokens_per_s=tokens / elapsed,
        engine_args={k: v for k, v in engine_kwargs.items() if isinstance(v, (int, float, str, bool, type(None)))})
    if baseline == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(model, device="cpu")
        if model_dtype != "float32":
            st = st.to(getattr(torch, model_dtype))
        st.encode(random_texts(4, input_len, seed + 1), batch_size=baseline_batch_size)
        start = time.perf_counter()
        ref = st.encode(texts, batch_size=baseline_batch_size, convert_to_tensor=True)
        base_s = time.perf_counter() - start
        result.baseline = f"sentence-transformers (batch_size={baseline_batch_size})"
        result.baseline_elapsed_s = base_s
        result.baseline_sequences_per_s = num_prompts / base_s
        result.speedup = base_s / elapsed
        result.min_cosine_vs_baseline = float(torch.nn.functional.cosine_similarity(ours, ref.float()).min())
    elif baseline is not None:
        raise ValueError(f"baseline: only 'sentence-transformers' is supported, got {baseline!r}")
    result.peak_rss_mb = peak_rss_mb()
    return result
