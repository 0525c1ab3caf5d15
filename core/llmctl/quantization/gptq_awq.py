"""GPTQ (AutoGPTQ / GPTQModel) and AWQ (AutoAWQ, GEMM packing) checkpoints.

GPTQ: ``qweight`` int32 ``[K*b/32, N]`` packed along K, ``qzeros`` int32 ``[G, N*b/32]`` packed along N,
``scales`` ``[G, N]``, ``g_idx`` int32 ``[K]`` (the group of each input column; with act-order, ``desc_act``,
groups are not contiguous). Weight = ``scale[g_idx[k]] * (q - z)``, where the stored zero is ``z - 1`` in the
original ("gptq") checkpoint format and ``z`` in "gptq_v2". Act-order layers are held with K permuted so each
group is contiguous, and the activations are permuted the same way at run time.

AWQ (GEMM): ``qweight`` int32 ``[K, N/8]`` and ``qzeros`` int32 ``[G, N/8]`` packed along N in the order
``AWQ_PACK_ORDER``, ``scales`` ``[G, N]``; weight = ``scale * (q - z)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from llmctl.quantization.base import LinearQuantizer, QParam, QuantConfig, QuantizedPart
from llmctl.quantization.packing import awq_unpack, groups_to_int4, unpack_int32

if TYPE_CHECKING:
    from llmctl.layers.linear import Linear


def _int_weights(layer: Linear, spec_fn: Any, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bits: int, group: int, perm: torch.Tensor | None) -> QuantizedPart:
    """Unsigned values ``q`` [N, K] and per-group ``scales``/``zeros`` [N, G] -> a core format."""
    if bits == 4:
        weights = groups_to_int4(q, scales, zeros)
        spec = spec_fn(layer, "int4", 4, group)
    else:
        s = scales.to(torch.float32)
        weights = {"qweight": (q - 128).to(torch.int8).contiguous(), "scales": s.contiguous(),
                   "mins": (-s * (zeros.to(torch.float32) - 128)).contiguous()}
        spec = spec_fn(layer, "int8", 8, group)
    if perm is not None:
        weights["perm"] = perm
    return QuantizedPart(spec, weights)


class GPTQLinear(LinearQuantizer):
    method = "gptq"

    def __init__(self, prefix: str, bits: int, group_size: int, zero_offset: int) -> None:
        super().__init__(prefix)
        self.bits, self.group_size, self.zero_offset = bits, group_size, zero_offset

    def _group(self, k: int) -> int:
        g = k if self.group_size == -1 else self.group_size
        if k % g:
            raise ValueError(f"quantization gptq: layer {self.prefix}: in_features {k} is not a multiple of "
                             f"group_size {g}")
        return g

    def params(self, layer: Linear, dtype: torch.dtype) -> dict[str, QParam]:
        n, k, per = layer.out_features, layer.in_features, 32 // self.bits
        groups = k // self._group(k)
        return {"qweight": QParam((k // per, n), torch.int32, out_dim=1),
                "qzeros": QParam((groups, n // per), torch.int32, out_dim=1, out_pack=per),
                "scales": QParam((groups, n), torch.float32, out_dim=1),
                "g_idx": QParam((k,), torch.int32, out_dim=None)}

    def finish(self, layer: Linear) -> list[QuantizedPart]:
        k, group = layer.in_features, self._group(layer.in_features)
        q = unpack_int32(self.take(layer, "qweight"), self.bits, dim=0).t()  # [N, K]
        zeros = (unpack_int32(self.take(layer, "qzeros"), self.bits, dim=1) + self.zero_offset).t()  # [N, G]
        scales = self.take(layer, "scales").t()
        g_idx = self.take(layer, "g_idx").reshape(-1, k).to(torch.int64)
        if all(torch.equal(g_idx[0], other) for other in g_idx[1:]):
            return [self._part(layer, q, scales, zeros, g_idx[0], group, None)]
        # Stacked projections with their own act-order (checkpoints usually share one per input): one part each.
        parts, row = [], 0
        for i, size in enumerate(layer.output_sizes):  # type: ignore[attr-defined]
            rows = slice(row, row + size)
            parts.append(self._part(layer, q[rows], scales[rows], zeros[rows], g_idx[i], group, rows))
            row += size
        return parts

    def _part(self, layer: Linear, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
              group: int, rows: slice | None) -> QuantizedPart:
        k = layer.in_features
        groups = k // group
        if g_idx.min() < 0 or g_idx.max() >= groups or not torch.equal(
                torch.bincount(g_idx, minlength=groups), torch.full((groups,), group)):
            raise ValueError(f"quantization gptq: layer {self.prefix}: g_idx does not assign {group} input columns "
                             f"to each of {groups} groups")
        perm = None
        if not torch.equal(g_idx, torch.arange(k) // group):
            perm = torch.argsort(g_idx, stable=True)
            q = q[:, perm]
        part = _int_weights(layer, self.spec, q, scales, zeros, self.bits, group, perm)
        if rows is not None:
            part.spec = dataclasses.replace(part.spec, out_features=rows.stop - rows.start)
            part.out_slice = rows
        return part


class AWQLinear(LinearQuantizer):
    method = "awq"

    def __init__(self, prefix: str, group_size: int) -> None:
        super().__init__(prefix)
        self.group_size = group_size

    def params(self, layer: Linear, dtype: torch.dtype) -> dict[str, QParam]:
        n, k = layer.out_features, layer.in_features
        if k % self.group_size:
            raise ValueError(f"quantization awq: layer {self.prefix}: in_features {k} is not a multiple of "
                             f"group_size {self.group_size}")
        groups = k // self.group_size
        return {"qweight": QParam((k, n // 8), torch.int32, out_dim=1, out_pack=8),
                "qzeros": QParam((groups, n // 8), torch.int32, out_dim=1, out_pack=8),
                "scales": QParam((groups, n), torch.float32, out_dim=1)}

    def finish(self, layer: Linear) -> list[QuantizedPart]:
        q = awq_unpack(self.take(layer, "qweight")).t()
        zeros = awq_unpack(self.take(layer, "qzeros")).t()
        scales = self.take(layer, "scales").t()
        return [_int_weights(layer, self.spec, q, scales, zeros, 4, self.group_size, None)]


def _skipped(prefix: str, shard_names: Sequence[str], skip: Sequence[str]) -> bool:
    hits = [any(s and (s in n.split(".") or n.endswith(s)) for s in skip) for n in shard_names]
    if any(hits) and not all(hits):
        raise ValueError(f"quantization: layer {prefix} stacks projections of which only some are left unquantized")
    return bool(hits) and all(hits)


class GPTQConfig(QuantConfig):
    name = "gptq"

    def __init__(self, bits: int, group_size: int, desc_act: bool, zero_offset: int) -> None:
        self.bits, self.group_size, self.desc_act, self.zero_offset = bits, group_size, desc_act, zero_offset

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> GPTQConfig:
        bits, group = int(qc.get("bits", 0)), int(qc.get("group_size", -1))
        if bits not in (4, 8):
            raise ValueError(f"quantization gptq: bits={bits} is not supported; supported: 4, 8")
        if group != -1 and (group <= 0 or group % 8):
            raise ValueError(f"quantization gptq: group_size={group} is not supported; use -1 or a multiple of 8")
        fmt = str(qc.get("checkpoint_format") or "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"quantization gptq: checkpoint_format {fmt!r} is not supported; supported: gptq, "
                             f"gptq_v2")
        return cls(bits, group, bool(qc.get("desc_act", False)), 1 if fmt == "gptq" else 0)

    def describe(self) -> str:
        return f"gptq ({self.bits}-bit, group {self.group_size}{', act-order' if self.desc_act else ''})"

    def linear_quantizer(self, prefix: str, layer: Linear, shard_names: Sequence[str]) -> LinearQuantizer | None:
        return GPTQLinear(prefix, self.bits, self.group_size, self.zero_offset)


class AWQConfig(QuantConfig):
    name = "awq"

    def __init__(self, group_size: int, skip: list[str]) -> None:
        self.group_size, self.skip = group_size, skip

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> AWQConfig:
        bits = int(qc.get("bits", qc.get("w_bit", 0)))
        group = int(qc.get("group_size", qc.get("q_group_size", 0)))
        version = str(qc.get("version", "gemm")).lower()
        if bits != 4:
            raise ValueError(f"quantization awq: bits={bits} is not supported; supported: 4")
        if group <= 0 or group % 8:
            raise ValueError(f"quantization awq: group_size={group} is not supported; use a positive multiple of 8")
        if version != "gemm":
            raise ValueError(f"quantization awq: version {version!r} is not supported; supported: gemm")
        return cls(group, list(qc.get("modules_to_not_convert") or []))

    def describe(self) -> str:
        return f"awq (4-bit, group {self.group_size})"

    def linear_quantizer(self, prefix: str, layer: Linear, shard_names: Sequence[str]) -> LinearQuantizer | None:
        if _skipped(prefix, shard_names, self.skip):
            return None
        return AWQLinear(prefix, self.group_size)
