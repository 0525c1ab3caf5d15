#!/usr/bin/env python
"""Where one prompt's prefill goes, part by part, next to what this host can do for each part.

The companion of ``profile_decode.py`` for long prompts: one request of ``--input-len`` random tokens (one chunk,
``max_tokens=1``) runs through the engine eagerly, and a timer around every module call gives each part's own
time (its time minus its children's): the QKV / O and MLP GEMMs, attention (the KV write and the kernel),
norms, rotary embedding, the elementwise rest of the layers (residual adds, reshapes, an unfused SiLU), the
embedding, the LM head, sampling, and what is left outside the model (scheduling, batch preparation, outputs).

Each part is set against a ceiling measured in the same process on this host:

* GEMMs and attention against the best library GEMM at the same shapes: torch's float32 ``linear`` (MKL /
  oneDNN) at ``[T, K] x [K, N]``, and torch's own GEMM in the run's dtype where the CPU computes in it (bf16 dot
  products or AMX); on a host without them a bf16 GEMM is float32 FMAs after conversion, so the float32 figure
  is its ceiling too. Attention's FLOPs (4 * head_dim * heads * keys summed over the causal rows) are set against
  the ceiling of the QKV shape.
* Norms, rotary, elementwise, the embedding and sampling against the copy bandwidth: the bytes their inputs and
  outputs hold, read or written once.

    .venv/bin/python benchmarks/profile_prefill.py --model W2_DIR --dtype bfloat16 --input-len 1024 8192

The roofline GEMMs at 8192 rows take some seconds each; ``--no-roofline`` skips them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from llmctl import LLM, SamplingParams
from llmctl.bench.common import random_token_prompts

# A module's own time goes to the first category whose key is in its qualified name (checked in this order).
CATEGORIES = (
    ("qkv_proj", "QKV GEMM"), ("o_proj", "O GEMM"), ("gate_up_proj", "MLP GEMMs"), ("down_proj", "MLP GEMMs"),
    (".mlp", "MLP GEMMs"),  # the fused gate/up GEMM (with SiLU) runs inside GatedMLP's own forward
    (".attn", "attention"), ("rotary", "rotary"), ("norm", "norms"), ("embed_tokens", "embedding"),
    ("lm_head", "LM head"),
)
OTHER_IN_MODEL = "elementwise glue"  # the rest of a layer's own time: residual adds, views, q/k/v splits


@dataclass
class PartTimes:
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    bytes: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    kv_write: float = 0.0
    model: float = 0.0
    sampling: float = 0.0


def _category(name: str) -> str:
    for key, cat in CATEGORIES:
        if key in name:
            return cat
    return OTHER_IN_MODEL


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    return 0


def _instrument(model: torch.nn.Module, times: PartTimes) -> Any:
    """Every submodule's own (exclusive) time into its category, and the bytes of its tensor inputs and outputs;
    the model's total into ``times.model``; the KV write separately (it runs inside attention)."""
    stack: list[list[float]] = []  # [start, children's time]
    names = {id(mod): name for name, mod in model.named_modules()}
    cats = {name: _category(name) for name in names.values()}

    def timed_call(original: Any) -> Any:
        def call(mod: torch.nn.Module, *args: Any, **kw: Any) -> Any:
            name = names.get(id(mod))
            if name is None:  # a module outside the model (a draft's, say): not ours to count
                return original(mod, *args, **kw)
            stack.append([time.perf_counter(), 0.0])
            out = None
            try:
                out = original(mod, *args, **kw)
                return out
            finally:
                start, children = stack.pop()
                inclusive = time.perf_counter() - start
                if stack:
                    stack[-1][1] += inclusive
                if name == "":
                    times.model += inclusive
                    times.seconds[OTHER_IN_MODEL] += inclusive - children
                else:
                    times.seconds[cats[name]] += inclusive - children
                    if not any(True for _ in mod.children()):  # leaves only: a parent's tensors are its children's
                        times.bytes[cats[name]] += _nbytes(args) + _nbytes(out)
        return call

    # EngineModule's call is its class's forward (no nn.Module hooks run), so the timer goes on the classes; every
    # original is read before any class is patched, so a subclass never wraps its parent's wrapper.
    classes = {type(mod) for mod in model.modules()}
    originals = {cls: (cls.__dict__.get("__call__"), cls.__call__) for cls in classes}
    for cls, (_, call) in originals.items():
        cls.__call__ = timed_call(call)
    backends: dict[int, Any] = {}
    for mod in model.modules():
        backend = getattr(mod, "backend", None)
        if backend is not None and id(backend) not in backends and hasattr(backend, "write_kv"):
            backends[id(backend)] = backend
            write = backend.write_kv

            def timed_write(*args: Any, _write: Any = write, **kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return _write(*args, **kw)
                finally:
                    times.kv_write += time.perf_counter() - t
            backend.write_kv = timed_write

    compute = model.compute_logits

    def timed_logits(hidden: torch.Tensor) -> torch.Tensor:
        stack.append([time.perf_counter(), 0.0])
        try:
            return compute(hidden)
        finally:
            start, children = stack.pop()
            dt = time.perf_counter() - start
            times.seconds["LM head"] += dt - children  # the lm_head module's own call counted itself
            times.model += dt
    model.compute_logits = timed_logits

    def undo() -> None:
        for cls, (own, _) in originals.items():
            if own is None:
                del cls.__call__
            else:
                cls.__call__ = own
        for backend in backends.values():
            del backend.write_kv
        del model.compute_logits
    return undo


def _wrap_sampler(core: Any, times: PartTimes) -> Any:
    sampler = core.sampler

    def timed(*args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return sampler(*args, **kw)
        finally:
            times.sampling += time.perf_counter() - t
    core.sampler = timed

    def undo() -> None:
        core.sampler = sampler
    return undo


def best_time(fn: Any, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_ceiling(m: int, n: int, k: int, dtype: torch.dtype, reps: int) -> dict[str, float]:
    """GFLOP/s of torch's linear at [m, k] x [k, n]: float32, and ``dtype`` where this CPU computes in it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * 0.02
    res = {"float32": 2.0 * m * n * k / best_time(lambda: F.linear(x, w), reps) / 1e9}
    if dtype != torch.float32 and _native_low_precision(dtype):
        xl, wl = x.to(dtype), w.to(dtype)
        res[str(dtype).replace("torch.", "")] = 2.0 * m * n * k / best_time(lambda: F.linear(xl, wl), reps) / 1e9
    return res


def _native_low_precision(dtype: torch.dtype) -> bool:
    """Whether torch's CPU GEMM computes in ``dtype`` here (bf16 dot products / AMX), rather than emulating it."""
    try:
        return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def copy_bandwidth(nbytes: int = 256 << 20) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / best_time(lambda: dst.copy_(src), 5) / 1e9


@dataclass(frozen=True)
class Shapes:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, cfg: Any) -> Shapes:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.hidden_size, cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None)
                   or cfg.num_attention_heads, head_dim, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size)

    def gemm_shapes(self) -> dict[str, list[tuple[int, int]]]:
        """(N, K) of each category's GEMMs per layer."""
        return {"QKV GEMM": [((self.heads + 2 * self.kv_heads) * self.head_dim, self.hidden)],
                "O GEMM": [(self.hidden, self.heads * self.head_dim)],
                "MLP GEMMs": [(2 * self.intermediate, self.hidden), (self.hidden, self.intermediate)]}

    def attention_flops(self, t: int) -> float:
        """QK^T and PV over the causal rows of a t-token prompt, all layers."""
        return 4.0 * self.head_dim * self.heads * (t * (t + 1) / 2) * self.layers


def _prefill_once(llm: LLM, input_len: int, seed: int) -> tuple[float, float]:
    """(TTFT: request added to first token, wall of the steps) for one prompt of ``input_len`` random tokens."""
    eng = llm.llm_engine
    prompt = random_token_prompts(1, input_len, eng.model_config.vocab_size, seed=seed)[0]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    t0 = time.perf_counter()
    eng.add_request(f"prefill-{seed}-{input_len}", {"prompt_token_ids": prompt}, params)
    steps = 0.0
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        eng.step()
        steps += time.perf_counter() - t
    return time.perf_counter() - t0, steps


def profile(llm: LLM, shapes: Shapes, input_len: int, ceilings: dict[str, dict[str, float]], bandwidth: float,
            seed: int) -> dict[str, Any]:
    times = PartTimes()
    core = llm.llm_engine.core
    model = core.runner.model
    undo = [_instrument(model, times), _wrap_sampler(core, times)]
    try:
        ttft, steps = _prefill_once(llm, input_len, seed)
    finally:
        for u in undo:
            u()
    parts: dict[str, float] = dict(times.seconds)
    parts["attention"] = parts.get("attention", 0.0)
    parts["sampling"] = times.sampling
    parts["outside the model"] = steps - times.model - times.sampling
    flops = {cat: 2.0 * input_len * sum(n * k for n, k in nk) * shapes.layers
             for cat, nk in shapes.gemm_shapes().items()}
    flops["attention"] = shapes.attention_flops(input_len)
    flops["LM head"] = 2.0 * shapes.hidden * shapes.vocab
    rows = []
    for cat, sec in sorted(parts.items(), key=lambda kv: -kv[1]):
        row: dict[str, Any] = {"part": cat, "seconds": sec, "share": sec / steps}
        if cat in flops and cat != "LM head":
            ceiling = ceilings.get(cat) or ceilings["QKV GEMM"]
            peak = max(ceiling.values())
            row.update(gflops=flops[cat] / sec / 1e9, ceiling_gflops=peak, roofline_s=flops[cat] / peak / 1e9)
        elif cat in times.bytes or cat == "LM head":
            nbytes = times.bytes.get(cat, 0.0)
            if cat == "LM head":  # one row: its weight read once
                nbytes = shapes.vocab * shapes.hidden * torch.finfo(model_dtype(model)).bits / 8
            row.update(gbytes_per_s=nbytes / sec / 1e9, ceiling_gbytes_per_s=bandwidth,
                       roofline_s=nbytes / bandwidth / 1e9)
        if "roofline_s" in row:
            row["of_roofline"] = row["roofline_s"] / sec
        rows.append(row)
    gemm_flops = sum(flops[c] for c in ("QKV GEMM", "O GEMM", "MLP GEMMs"))
    gemm_s = sum(parts.get(c, 0.0) for c in ("QKV GEMM", "O GEMM", "MLP GEMMs"))
    prefill_flops = gemm_flops + flops["attention"]
    peak = max(ceilings["MLP GEMMs"].values())
    return {"input_len": input_len, "ttft_s": ttft, "step_s": steps, "kv_write_s": times.kv_write, "parts": rows,
            "gemm_gflops": gemm_flops / gemm_s / 1e9 if gemm_s else None,
            "prefill_gflops": prefill_flops / steps / 1e9,
            "prefill_of_gemm_roofline": prefill_flops / steps / 1e9 / peak}


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def print_report(dtype: str, res: dict[str, Any]) -> None:
    print(f"\nprompt {res['input_len']} tokens, {dtype}: TTFT {res['ttft_s']:.2f} s (steps {res['step_s']:.2f} s, "
          f"of which KV write {res['kv_write_s'] * 1e3:.0f} ms); whole prefill {res['prefill_gflops']:.1f} GFLOP/s "
          f"= {100 * res['prefill_of_gemm_roofline']:.0f} % of the MLP GEMM ceiling")
    print(f"  {'part':26s} {'s':>8s} {'share':>6s}  {'achieved':>14s} {'ceiling':>14s} {'of roofline':>11s}")
    for r in res["parts"]:
        if "gflops" in r:
            ach, ceil = f"{r['gflops']:.1f} GFLOP/s", f"{r['ceiling_gflops']:.1f} GFLOP/s"
        elif "gbytes_per_s" in r:
            ach, ceil = f"{r['gbytes_per_s']:.1f} GB/s", f"{r['ceiling_gbytes_per_s']:.1f} GB/s"
        else:
            ach = ceil = ""
        frac = f"{100 * r['of_roofline']:.0f} %" if "of_roofline" in r else ""
        print(f"  {r['part']:26s} {r['seconds']:8.3f} {100 * r['share']:5.1f}%  {ach:>14s} {ceil:>14s} {frac:>11s}")


@contextlib.contextmanager
def _tiled_prefill(on: bool) -> Iterator[None]:
    """With ``on`` False, the attention plan sees no query-tiled bf16 prefill kernel (plans are built per step)."""
    try:
        from llmctl_cpu import native

        lib = native.kernels()
    except ImportError:
        lib = None
    if lib is None or on:
        yield
        return
    was = lib.has_prefill_bf16
    lib.has_prefill_bf16 = False
    try:
        yield
    finally:
        lib.has_prefill_bf16 = was


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--input-len", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--roofline-reps", type=int, default=2)
    ap.add_argument("--no-roofline", action="store_true", help="skip the ceiling GEMMs (prints times only)")
    ap.add_argument("--baseline-attention", action="store_true",
                    help="run each length twice: as the engine runs by default, then with the query-tiled bf16 prefill "
                         "kernel switched off (bf16 chunks as per-row decodes up to the C kernel's length limit, "
                         "torch's flash kernel past it); for before/after ratios in one run")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    longest = max(a.input_len)
    # no prefix cache: every run computes its whole prompt (random prompts of one seed share their first tokens)
    llm = LLM(a.model, dtype=a.dtype, enforce_eager=True, max_model_len=longest + 16,
              max_num_batched_tokens=max(longest, 2048), max_num_seqs=1, kv_cache_memory=(longest + 64) * 1 << 17,
              enable_prefix_caching=False)
    shapes = Shapes.of(llm.llm_engine.model_config.hf_config)
    dtype = getattr(torch, a.dtype)
    bandwidth = copy_bandwidth()
    _prefill_once(llm, 64, seed=1)  # warm: lazy initialisation, first kernel calls
    out: dict[str, Any] = {"dtype": a.dtype, "torch_threads": torch.get_num_threads(), "copy_GBps": bandwidth,
                           "runs": []}
    print(f"{a.model}: dtype {a.dtype}, torch threads {torch.get_num_threads()}, copy bandwidth {bandwidth:.1f} GB/s")
    for n in a.input_len:
        if a.no_roofline:
            ceilings = {cat: {"float32": float("inf")} for cat in shapes.gemm_shapes()}
        else:
            ceilings = {}
            for cat, nk in shapes.gemm_shapes().items():  # the category's FLOP-weighted ceiling
                per = [(gemm_ceiling(n, nn, k, dtype, a.roofline_reps), nn * k) for nn, k in nk]
                keys = per[0][0].keys()
                total = sum(w for _, w in per)
                ceilings[cat] = {key: total / sum(w / c[key] for c, w in per) for key in keys}
            print(f"  ceilings at {n} rows (GFLOP/s): "
                  + ", ".join(f"{c} {max(v.values()):.1f}" for c, v in ceilings.items()))
        for baseline in ([False, True] if a.baseline_attention else [False]):
            with _tiled_prefill(not baseline):
                res = profile(llm, shapes, n, ceilings, bandwidth, seed=7)
            res["ceilings_gflops"] = ceilings
            res["attention_path"] = "baseline (no tiled prefill kernel)" if baseline else "default"
            print_report(a.dtype + (", baseline attention" if baseline else ""), res)
            out["runs"].append(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
