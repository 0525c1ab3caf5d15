"""Decode-step latency and offline throughput of llmctl on one GPU, for a Llama-3-8B-shaped model with random
bf16 weights (no download: the checkpoint is generated locally once).

Reports, per decode batch size, the measured step time next to the memory-bandwidth floor (weight bytes plus the
KV bytes one step reads, divided by the device's measured copy bandwidth), then offline throughput of
``--num-prompts`` prompts of ``--input-len`` tokens generating ``--output-len`` tokens each, against
``transformers`` ``generate`` on the same weights.

    python benchmarks/gpu_decode.py --out-json decode.json
    python benchmarks/gpu_decode.py --batch-sizes 1 32 --skip-hf      # quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


def require_gpu() -> None:
    if not torch.cuda.is_available():
        build = ("CPU-only" if torch.version.cuda is None and getattr(torch.version, "hip", None) is None
                 else f"CUDA {torch.version.cuda}" if torch.version.cuda else f"HIP {torch.version.hip}")
        sys.exit(f"gpu_decode.py needs a CUDA or ROCm GPU, but torch.cuda.is_available() is False "
                 f"(torch {torch.__version__}, {build} build). Run it on a GPU host with llmctl-cuda or llmctl-rocm "
                 f"installed.")


def make_checkpoint(out: Path, layers: int, vocab: int) -> Path:
    """Save a randomly initialised Llama-3-8B-shaped bf16 checkpoint (about 16 GB) plus a tokenizer, once."""
    if (out / "config.json").exists():
        return out
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    cfg = tf.LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers, "vocab_size": vocab,
                            "bos_token_id": 1, "eos_token_id": 2}, torch_dtype=torch.bfloat16)
    with torch.device("cuda"):
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(out, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    tok = _tokenizer(out.parent)
    tok.save_pretrained(out)
    return out


def _tokenizer(cache: Path):
    """The repo's test tokenizer (SmolLM2, converted from the packaged GGUF); prompts are token ids anyway."""
    from llmctl_testkit.smollm2 import load_test_tokenizer

    return load_test_tokenizer(cache)


def copy_bandwidth(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device memory bandwidth in bytes/s from a large device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * nbytes * iters / (time.perf_counter() - start)


def weight_bytes(layers: int, vocab: int) -> int:
    h, i, kvh, hd = LLAMA3_8B["hidden_size"], LLAMA3_8B["intermediate_size"], 8, 128
    per_layer = h * h * 2 + h * kvh * hd * 2 + 3 * h * i + 2 * h  # q,o + k,v + gate/up/down + norms
    return 2 * (layers * per_layer + 2 * vocab * h + h)  # bf16; embedding + lm_head (the step reads lm_head)


def kv_bytes_per_token(layers: int) -> int:
    return 2 * layers * 8 * 128 * 2  # K and V, 8 KV heads x 128, bf16


def timed_generate(llm, prompts, params) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_decode(llm, layers: int, vocab: int, batch_sizes: list[int], ctx: int, steps: int, bw: float) -> list[dict]:
    from llmctl import SamplingParams

    rows = []
    gen = torch.Generator().manual_seed(0)
    for b in batch_sizes:
        prompts = [{"prompt_token_ids": torch.randint(3, 32000, (ctx,), generator=gen).tolist()} for _ in range(b)]
        prefill_only = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        with_decode = SamplingParams(temperature=0, max_tokens=1 + steps, ignore_eos=True)
        timed_generate(llm, prompts[:1], prefill_only)  # warm-up (compilation, graph capture)
        t1 = timed_generate(llm, prompts, prefill_only)
        t2 = timed_generate(llm, prompts, with_decode)
        step = max(t2 - t1, 0.0) / steps
        avg_ctx = ctx + steps / 2
        bytes_step = weight_bytes(layers, vocab) + b * avg_ctx * kv_bytes_per_token(layers)
        floor = bytes_step / bw
        rows.append({"batch": b, "context": ctx, "step_ms": step * 1e3, "floor_ms": floor * 1e3,
                     "fraction_of_floor": floor / step if step else None, "tokens_per_s": b / step if step else None})
        print(f"decode batch {b:4d}: {step * 1e3:8.2f} ms/step   floor {floor * 1e3:7.2f} ms   "
              f"({100 * floor / step:5.1f}% of bandwidth bound)   {b / step:9.0f} tok/s", flush=True)
    return rows


def bench_offline(llm, n: int, inp: int, out: int) -> dict:
    from llmctl import SamplingParams

    gen = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(3, 32000, (inp,), generator=gen).tolist()} for _ in range(n)]
    elapsed = timed_generate(llm, prompts, SamplingParams(temperature=0, max_tokens=out, ignore_eos=True))
    res = {"prompts": n, "input_len": inp, "output_len": out, "seconds": elapsed,
           "output_tok_per_s": n * out / elapsed, "total_tok_per_s": n * (inp + out) / elapsed}
    print(f"llmctl offline: {n} x ({inp} in / {out} out) in {elapsed:.1f} s -> {res['output_tok_per_s']:.0f} out tok/s",
          flush=True)
    return res


def bench_hf(ckpt: Path, n: int, inp: int, out: int, batch: int) -> dict:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.bfloat16).cuda().eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (n, inp), generator=gen)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, batch):
            chunk = ids[i:i + batch].cuda()
            model.generate(chunk, attention_mask=torch.ones_like(chunk), max_new_tokens=out, min_new_tokens=out,
                           do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    res = {"prompts": n, "batch": batch, "seconds": elapsed, "output_tok_per_s": n * out / elapsed}
    print(f"transformers generate: {n} prompts (batch {batch}) in {elapsed:.1f} s -> "
          f"{res['output_tok_per_s']:.0f} out tok/s", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint-dir", type=Path,
                    default=Path(tempfile.gettempdir()) / "llmctl-bench" / "llama3-8b-random")
    ap.add_argument("--layers", type=int, default=LLAMA3_8B["num_hidden_layers"])
    ap.add_argument("--vocab-size", type=int, default=LLAMA3_8B["vocab_size"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--context", type=int, default=512, help="prompt length before the measured decode steps")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--out-json", type=Path)
    args = ap.parse_args()
    require_gpu()

    from llmctl import LLM

    ckpt = make_checkpoint(args.checkpoint_dir, args.layers, args.vocab_size)
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name(0)}; measured copy bandwidth {bw / 1e9:.0f} GB/s; "
          f"weights {weight_bytes(args.layers, args.vocab_size) / 2**30:.1f} GiB", flush=True)
    llm = LLM(model=str(ckpt), dtype="bfloat16", max_model_len=max(args.context, args.input_len) + 256,
              max_num_seqs=max(args.batch_sizes), enable_prefix_caching=False, enforce_eager=args.enforce_eager)
    report = {"device": torch.cuda.get_device_name(0), "copy_bandwidth_Bps": bw,
              "decode": bench_decode(llm, args.layers, args.vocab_size, args.batch_sizes, args.context, args.steps, bw),
              "offline": bench_offline(llm, args.num_prompts, args.input_len, args.output_len)}
    del llm
    torch.cuda.empty_cache()
    if not args.skip_hf:
        report["transformers"] = bench_hf(ckpt, args.num_prompts, args.input_len, args.output_len, args.hf_batch)
        report["speedup_vs_transformers"] = (report["offline"]["output_tok_per_s"]
                                             / report["transformers"]["output_tok_per_s"])
        print(f"llmctl / transformers output throughput: {report['speedup_vs_transformers']:.2f}x")
    if args.out_json:
        args.out_json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
