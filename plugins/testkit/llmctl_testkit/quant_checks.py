"""Contract checks for quantized-linear kernels (``QuantMethod``): each kernel a platform registers is run on
weights of its format at odd shapes and 1, 7, 64 and 300 rows, and compared with core's reference
(``llmctl.quantization.reference.reference_linear``, dequantize then matmul in float32)."""

from __future__ import annotations

import torch
from llmctl.plugins.types import QuantLinearSpec, QuantMethod
from llmctl.quantization.packing import pack_nibbles
from llmctl.quantization.reference import reference_linear

from llmctl_testkit.harness import ContractViolation, assert_close, require

ROWS = (1, 7, 64, 300)


def quant_cases(fmt: str, gen: torch.Generator) -> list[tuple[QuantLinearSpec, dict[str, torch.Tensor]]]:
    """Weights in each layout of ``fmt`` (see ``QuantLinearSpec``): per-channel and grouped, with and without
    mins, act-order permutation, quantized activations."""
    def r(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen)

    cases: list[tuple[QuantLinearSpec, dict[str, torch.Tensor]]] = []
    if fmt == "int4":
        for n, k, group, perm in ((37, 256, 32, False), (45, 384, 128, True), (24, 576, 576, False)):
            q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
            w = {"qweight": pack_nibbles(q), "scales": r(n, k // group) * 0.1, "mins": -r(n, k // group)}
            if perm:
                w["perm"] = torch.randperm(k, generator=gen)
            cases.append((QuantLinearSpec("int4", k, n, 4, group), w))
    elif fmt == "int8":
        for n, k, group, act in ((37, 203, 203, "int8"), (45, 256, 32, None), (24, 192, 64, None)):
            q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
            w = {"qweight": q, "scales": r(n, k // group) * 0.01}
            if act is None and group == 64:
                w["mins"] = r(n, k // group) * 0.1 - 0.05
            cases.append((QuantLinearSpec("int8", k, n, 8, group, act=act), w))
    elif fmt == "fp8":
        for n, k, act, per_tensor in ((37, 200, "fp8", False), (24, 128, None, True)):
            q = (torch.randn(n, k, generator=gen) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
            scales = r(1, 1) * 0.01 if per_tensor else r(n, 1) * 0.01
            cases.append((QuantLinearSpec("fp8", k, n, 8, k, act=act), {"qweight": q, "scales": scales}))
    return cases


def check_quant_kernel(kernel: QuantMethod, device: torch.device, dtype: torch.dtype) -> int:
    """Runs every case the kernel accepts (``supports``); returns how many ran. Its output must have ``x``'s dtype
    and shape ``[M, N]``, match the reference within the dtype's tolerance, and leave the weights it was given
    and the activations untouched."""
    clause = f"quantization.{kernel.name}"
    gen = torch.Generator().manual_seed(17)
    ran = 0
    for i, (spec, weights) in enumerate(quant_cases(kernel.name, gen)):
        if not kernel.supports(spec, dtype):
            continue
        before = {k: v.clone() for k, v in weights.items()}
        try:
            processed = kernel.process_weights({k: v.to(device) for k, v in weights.items()}, spec)
        except Exception as exc:
            raise ContractViolation(clause, f"process_weights raised {type(exc).__name__}: {exc} (case {i})") from exc
        require(all(torch.equal(before[k], weights[k]) for k in weights), clause + ".inputs_unchanged",
                f"process_weights modified its input (case {i})")
        for m in ROWS:
            x = torch.randn(m, spec.in_features, generator=gen).to(dtype)
            bias = torch.randn(spec.out_features, generator=gen).to(dtype) if m % 2 else None
            expected = reference_linear(x, weights, bias, spec)
            x_dev = x.to(device)
            try:
                got = kernel.apply(x_dev, processed, None if bias is None else bias.to(device), spec)
            except Exception as exc:
                raise ContractViolation(clause, f"apply raised {type(exc).__name__}: {exc} (case {i}, {m} rows)"
                                        ) from exc
            require(torch.equal(x_dev.cpu(), x), clause + ".inputs_unchanged", f"apply modified x (case {i})")
            require(got.dtype == dtype, clause, f"returned {got.dtype} for {dtype} activations (case {i})")
            assert_close(clause, got, expected, dtype, f"{spec.describe()} {spec.out_features}x{spec.in_features} "
                                                       f"at {m} rows (case {i})")
        ran += 1
    return ran
