#!/usr/bin/env python
"""The CPU backend's prefill attention alone, with the query-tiled bf16 kernel on and off, on one prompt.

The kernel-level companion of ``profile_prefill.py``: one sequence of ``--input-len`` tokens (no cached context)
through ``CpuSdpaAttention.forward`` at W2's attention shape by default, alternately with the tiled kernel (where
this host builds it) and without it (per-row decodes in C up to ``NATIVE_PREFILL_MAX_LEN`` keys, torch's flash
kernel past it). CPU time of the calling thread with one thread, which a shared host's load inflates far less than
wall time; wall time is printed too.

    .venv/bin/python benchmarks/prefill_attention.py --input-len 1024 2048 8192
"""

from __future__ import annotations

import argparse
import time

import torch
from llmctl.attention import AttentionMetadata
from llmctl.ops.paged_attention import write_kv_reference
from llmctl_cpu import native
from llmctl_cpu.attention import CpuSdpaAttention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input-len", type=int, nargs="+", default=[1024, 2048, 8192])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lib = native.kernels()
    if lib is None:
        raise SystemExit(f"the C kernels are not built: {native.status()[1]}")
    tiled_here = lib.has_prefill_bf16
    backend = CpuSdpaAttention()
    h, hk, d, bs = a.heads, a.kv_heads, a.head_size, a.block_size
    for t in a.input_len:
        blocks = -(-t // bs)
        gen = torch.Generator().manual_seed(t)
        cache = torch.randn(2, blocks, bs, hk, d, generator=gen).bfloat16()
        md = AttentionMetadata(num_tokens=t, num_seqs=1, query_start_loc=torch.tensor([0, t], dtype=torch.int32),
                               seq_lens=torch.tensor([t], dtype=torch.int32),
                               block_tables=torch.arange(blocks, dtype=torch.int32)[None], slot_mapping=torch.arange(t),
                               max_query_len=t, max_seq_len=t, block_size=bs, query_lens_cpu=[t], seq_lens_cpu=[t])
        key = torch.randn(t, hk, d, generator=gen).bfloat16()
        value = torch.randn(t, hk, d, generator=gen).bfloat16()
        write_kv_reference(key, value, cache, md.slot_mapping)
        query = torch.randn(t, h, d, generator=gen).bfloat16()
        flops = 4.0 * d * h * t * (t + 1) / 2
        outs = {}
        for tiled in [False, True] * a.reps:
            if tiled and not tiled_here:
                continue
            lib.has_prefill_bf16 = tiled
            md.plan_cache.clear()
            cpu, wall = time.thread_time(), time.perf_counter()
            outs[tiled] = backend.forward(query, cache, md, d ** -0.5, key=key, value=value)
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            print(f"{t} tokens, tiled kernel {'on ' if tiled else 'off'}: CPU {cpu:.3f} s "
                  f"({flops / cpu / 1e9:.1f} GFLOP/s), wall {wall:.3f} s", flush=True)
        lib.has_prefill_bf16 = tiled_here
        if len(outs) == 2:
            print(f"  largest difference between the two: {(outs[True].float() - outs[False].float()).abs().max():.4f}")


if __name__ == "__main__":
    main()
