#!/usr/bin/env python
"""Throughput of the new model paths against their baselines, measured in one run on the same machine.

* a Mixtral-shaped MoE and a Gemma-2-shaped model (random weights, small shapes): llmctl against transformers
  ``generate`` on the same prompts; the MoE also with the platform's ``fused_moe`` switched off
  (``LLMCTL_CPU_MOE_NATIVE=0``: the experts on core's torch reference), and Gemma 2 also on the torch-reference
  attention backend, so each kernel's gain is a ratio within one run;
* Llama of the same shape: llmctl's native implementation against its transformers fallback
  (``model_impl="transformers"``), i.e. what the fallback costs.

Every engine runs the same workload (``--prompts`` prompts of ``--input-len`` random token ids, ``--output-len``
greedy tokens, EOS ignored) one after the other in this process, after a warm-up. Prints one JSON line per
measurement and a summary table; ``--out`` writes the JSON.

    .venv/bin/python benchmarks/model_families.py --dtype bfloat16 --out benchmarks/results/model_families.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=49152, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=2048, initializer_range=0.02, tie_word_embeddings=False)


def build(kind: str, out: Path, dtype: torch.dtype, tok) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    if kind == "mixtral":
        cfg = tf.MixtralConfig(**{**SHAPE, "intermediate_size": SHAPE["intermediate_size"] // 2}, num_local_experts=8,
                               num_experts_per_tok=2)
        model = tf.MixtralForCausalLM(cfg)
    elif kind == "gemma2":
        cfg = tf.Gemma2Config(**SHAPE, head_dim=64, sliding_window=256, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0, query_pre_attn_scalar=64)
        model = tf.Gemma2ForCausalLM(cfg)
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**SHAPE))
    model.to(dtype).save_pretrained(out)
    tok.save_pretrained(out)  # the engine needs a tokenizer even for token-id prompts
    return out


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    from llmctl.bench.common import random_token_prompts

    return random_token_prompts(n, length, vocab, seed=0)


def time_llmctl(path: Path, dtype: str, ids: list[list[int]], output_len: int, threads: int | None, **kw) -> dict:
    from llmctl import LLM, SamplingParams

    if threads:
        kw["num_threads"] = threads
    llm = LLM(str(path), dtype=dtype, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts(2, 16, SHAPE["vocab_size"] - 1)],
                 SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    core = llm.llm_engine.core
    return {"elapsed_s": elapsed, "output_tokens": tokens, "tok_s": tokens / elapsed,
            "impl": core.model_impl, "attention": core.attention.name}


@contextlib.contextmanager
def env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def time_reference_moe(path: Path, dtype: str, ids: list[list[int]], output_len: int, threads: int | None) -> dict:
    """The same engine with the CPU plugin's fused_moe declined at load (its pack reads the switch then)."""
    with env("LLMCTL_CPU_MOE_NATIVE", "0"):
        return time_llmctl(path, dtype, ids, output_len, threads)


def time_transformers(path: Path, dtype: torch.dtype, ids: list[list[int]], output_len: int, batch: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    gen = dict(do_sample=False, min_new_tokens=output_len, max_new_tokens=output_len, pad_token_id=0)
    with torch.inference_mode():
        model.generate(torch.tensor(ids[:2]), attention_mask=torch.ones(2, len(ids[0]), dtype=torch.long),
                       **{**gen, "min_new_tokens": 4, "max_new_tokens": 4})
        t = time.perf_counter()
        tokens = 0
        for i in range(0, len(ids), batch):
            x = torch.tensor(ids[i:i + batch])
            out = model.generate(x, attention_mask=torch.ones_like(x), **gen)
            tokens += (out.shape[1] - x.shape[1]) * x.shape[0]
        elapsed = time.perf_counter() - t
    return {"elapsed_s": elapsed, "output_tokens": tokens, "tok_s": tokens / elapsed, "impl": "transformers"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    ap.add_argument("--hidden", type=int, default=SHAPE["hidden_size"], help="hidden size (MLP width 2.75x)")
    ap.add_argument("--models", default="mixtral,gemma2,llama", help="comma-separated subset of the three")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    SHAPE.update(num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75))
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = [k for k in ("mixtral", "gemma2", "llama") if k in args.models.split(",")]
    ids = prompts(args.prompts, args.input_len, SHAPE["vocab_size"])
    rows = []
    sys.path.insert(0, str(ROOT))
    from tests.model_factory import load_test_tokenizer  # SmolLM2's tokenizer (49152 ids), from its GGUF

    with tempfile.TemporaryDirectory() as tmp:
        tok = load_test_tokenizer(Path(tmp))
        for kind in kinds:
            path = build(kind, Path(tmp) / kind, dtype, tok)
            runs = [("llmctl", lambda p=path: time_llmctl(p, args.dtype, ids, args.output_len, args.threads))]
            if kind == "llama":
                runs.append(("llmctl-fallback", lambda p=path: time_llmctl(p, args.dtype, ids, args.output_len,
                                                                           args.threads, model_impl="transformers")))
            else:
                if kind == "mixtral":
                    runs.append(("llmctl-ref-moe", lambda p=path: time_reference_moe(p, args.dtype, ids,
                                                                                     args.output_len, args.threads)))
                else:  # the soft-capped attention on core's torch reference instead of the platform's backend
                    runs.append(("llmctl-ref-attn", lambda p=path: time_llmctl(
                        p, args.dtype, ids, args.output_len, args.threads, attention_backend="torch-reference")))
                runs.append(("transformers", lambda p=path: time_transformers(p, dtype, ids, args.output_len,
                                                                              args.hf_batch)))
            for engine, fn in runs:
                row = {"model": kind, "engine": engine, **fn()}
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(f"\n{'model':8} {'engine':16} {'impl':13} {'attention':16} {'tok/s':>8}", file=sys.stderr)
    for r in rows:
        print(f"{r['model']:8} {r['engine']:16} {r['impl']:13} {r.get('attention', '-'):16} {r['tok_s']:8.1f}",
              file=sys.stderr)
    for kind in kinds:
        a, *others = (r for r in rows if r["model"] == kind)
        for b in others:
            print(f"{kind}: {a['engine']}/{b['engine']} = {a['tok_s'] / b['tok_s']:.2f}x", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "shape": SHAPE,
                                        "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
