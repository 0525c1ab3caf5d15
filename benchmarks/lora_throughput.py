#!/usr/bin/env python
"""Offline throughput with 1, 4 and 16 LoRA adapters in one batch against the base model alone, in one run.

Adapters are random PEFT adapters (rank ``--rank``, every attention and MLP projection) made with peft on the
given checkpoint, so the work is what real fine-tunes cost. Every configuration runs the same prompts (random
token ids, EOS ignored), in its own fresh engine, one after the other; the table gives output tokens per second
(wall clock and CPU time) and the ratios to the base model measured in the same run. The base model's engine
replays recorded decode steps and fuses SiLU into the gate/up GEMM; with ``enable_lora`` both are off.
``--model`` may be a GGUF file: it is written out as a bf16 safetensors checkpoint first (peft needs one).
``--reference-op`` adds a run of the largest adapter count with ``lora_shrink_expand`` on the torch reference
instead of the CPU plugin's C kernel.

    .venv/bin/python benchmarks/lora_throughput.py --model PATH/TO/HF-CHECKPOINT --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def hf_checkpoint(model: str, root: Path) -> str:
    """``model`` itself, or for a GGUF file a bf16 safetensors directory of its dequantized weights."""
    if not model.endswith(".gguf"):
        return model
    import torch
    from llmctl.loader.gguf_file import open_gguf
    from llmctl.loader.gguf_hf import iter_hf_tensors
    from llmctl.loader.source import resolve_model
    from llmctl.loader.tokenizer import load_tokenizer
    from safetensors.torch import save_file

    out = root / "base"
    out.mkdir()
    source = resolve_model(model)
    source.hf_config.save_pretrained(out)
    load_tokenizer(source).save_pretrained(out)
    save_file({name: t.to(torch.bfloat16).contiguous() for name, t in iter_hf_tensors(open_gguf(Path(model)))},
              str(out / "model.safetensors"))
    return str(out)


def make_adapters(model: str, count: int, rank: int, root: Path) -> list[Path]:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        wrapped = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                            init_lora_weights=False))
        wrapped.save_pretrained(root / f"a{i}")
        paths.append(root / f"a{i}")
    return paths


def run(model: str, dtype: str, prompts: list[list[int]], output_len: int, adapters: list[Path]
        ) -> tuple[float, float]:
    """Output tokens per wall-clock second and per CPU second of this process (the latter moves less on a host
    shared with other work: time spent waiting for a core is not counted)."""
    from llmctl import LLM, LoRARequest, SamplingParams

    kwargs = dict(enable_lora=True, max_loras=len(adapters), max_lora_rank=64) if adapters else {}
    llm = LLM(model, dtype=dtype, **kwargs)
    loras = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    per_prompt = [loras[i % len(loras)] for i in range(len(prompts))] if loras else None
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    start, cpu_start = time.perf_counter(), time.process_time()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=per_prompt)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / elapsed, tokens / cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face checkpoint directory (safetensors)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--adapters", default="1,4,16", help="adapter counts to run, comma-separated")
    ap.add_argument("--reference-op", action="store_true",
                    help="also run the largest count with lora_shrink_expand on the torch reference")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 30000) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    counts = [int(c) for c in args.adapters.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = hf_checkpoint(args.model, Path(tmp))
        adapters = make_adapters(model, max(counts), args.rank, Path(tmp))
        results = {"base": run(model, args.dtype, prompts, args.output_len, [])}
        for c in counts:
            results[f"{c} adapters"] = run(model, args.dtype, prompts, args.output_len, adapters[:c])
        if args.reference_op:
            from llmctl_cpu import ops

            ops.lora_native = False
            results[f"{max(counts)}, torch op"] = run(model, args.dtype, prompts, args.output_len,
                                                      adapters[:max(counts)])
            ops.lora_native = True
    base, base_cpu = results["base"]
    print(f"{'configuration':<16} {'output tok/s':>12} {'vs base':>8} {'tok/CPU-s':>10} {'vs base':>8}")
    for name, (tps, per_cpu) in results.items():
        print(f"{name:<16} {tps:>12.1f} {tps / base:>7.2f}x {per_cpu:>10.1f} {per_cpu / base_cpu:>7.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
