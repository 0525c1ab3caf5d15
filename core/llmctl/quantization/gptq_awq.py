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
from llmctl.quantization.sharding import input_unit_refusal, rank_split

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

    def __init__(self, prefix: str, bits: int, group_size: int, zero_offset: int, desc_act: bool = False) -> None:
        super().__init__(prefix)
        self.bits, self.group_size, self.zero_offset = bits, group_size, zero_offset
        self.desc_act = desc_act and group_size != -1

    def _group(self, layer: Linear) -> int:
        k = layer.in_features
        g = k if self.group_size == -1 else self.group_size
        if k % g:
            raise ValueError(input_unit_refusal(self.method, self.prefix, layer, g, "group_size"))
        if k % (32 // self.bits):
            raise ValueError(input_unit_refusal(self.method, self.prefix, layer, 32 // self.bits, "int32 packing"))
        return g

    def _act_order_split(self, layer: Linear) -> bool:
        """A row-parallel rank of an act-order layer: its input columns belong to groups spread over every rank,
        so it holds every group's scales and zeros and the g_idx of its own columns."""
        split = rank_split(layer)
        return self.desc_act and split is not None and split[2] == "input"

    def params(self, layer: Linear, dtype: torch.dtype) -> dict[str, QParam]:
        n, k, per = layer.out_features, layer.in_features, 32 // self.bits
        group = self._group(layer)
        groups, by_group = k // group, (group, 1)
        group_dim: int | None = 0 if self.group_size != -1 else None  # per channel: one scale for all inputs
        if self._act_order_split(layer):
            groups, group_dim = k * layer.tp.size // group, None  # type: ignore[attr-defined]
        return {"qweight": QParam((k // per, n), torch.int32, out_dim=1, in_dim=0, in_unit=(per, 1)),
                "qzeros": QParam((groups, n // per), torch.int32, out_dim=1, out_pack=per, in_dim=group_dim,
                                 in_unit=by_group),
                "scales": QParam((groups, n), torch.float32, out_dim=1, in_dim=group_dim, in_unit=by_group),
                "g_idx": QParam((k,), torch.int32, out_dim=None, in_dim=0)}

    def finish(self, layer: Linear) -> list[QuantizedPart]:
        k, group = layer.in_features, self._group(layer)
        q = unpack_int32(self.take(layer, "qweight"), self.bits, dim=0).t()  # [N, K]
        zeros = (unpack_int32(self.take(layer, "qzeros"), self.bits, dim=1) + self.zero_offset).t()  # [N, G]
        scales = self.take(layer, "scales").t()
        g_idx = self.take(layer, "g_idx").reshape(-1, k).to(torch.int64)
        if self._act_order_split(layer):
            return [self._regrouped(layer, q, scales, zeros, g_idx[0])]
        split = rank_split(layer)
        if split is not None and split[2] == "input" and self.group_size != -1:
            g_idx = g_idx - split[0] * k // group  # this rank's groups, numbered from its first
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
                             f"to each of {groups} groups" + (" of this rank (desc_act is false, so the groups must "
                                                              "be contiguous)" if rank_split(layer) else ""))
        perm = None
        if not torch.equal(g_idx, torch.arange(k) // group):
            perm = torch.argsort(g_idx, stable=True)
            q = q[:, perm]
        part = _int_weights(layer, self.spec, q, scales, zeros, self.bits, group, perm)
        if rows is not None:
            part.spec = dataclasses.replace(part.spec, out_features=rows.stop - rows.start)
            part.out_slice = rows
        return part

    def _regrouped(self, layer: Linear, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   g_idx: torch.Tensor) -> QuantizedPart:
        """An act-order row-parallel rank's columns, gathered by group: each group's columns (any number, up to
        group_size, on this rank) fill whole sub-groups of ``sub`` columns, and the slots left over hold the
        group's zero point, a weight of exactly zero, fed any input column. The layer then runs in the usual
        contiguous-group format on ``x[:, perm]``, a little wider than the rank's own columns."""
        n, groups = scales.shape
        if g_idx.min() < 0 or g_idx.max() >= groups:
            raise ValueError(f"quantization gptq: layer {self.prefix}: g_idx names groups outside 0..{groups - 1}")
        counts = torch.bincount(g_idx, minlength=groups)
        sub = _sub_group(counts, self.group_size, self.bits)
        slots = (counts + sub - 1) // sub * sub
        width = int(slots.sum())
        slot_group = torch.repeat_interleave(torch.arange(groups), slots)
        order = torch.argsort(g_idx, stable=True)  # the rank's columns, group by group
        first_slot = torch.cumsum(slots, 0) - slots
        first_col = torch.cumsum(counts, 0) - counts
        sorted_groups = g_idx[order]
        at = first_slot[sorted_groups] + torch.arange(len(order)) - first_col[sorted_groups]
        perm = torch.zeros(width, dtype=torch.int64)
        perm[at] = order
        pad = torch.ones(width, dtype=torch.bool)
        pad[at] = False
        z_slots = zeros[:, slot_group]  # [N, width]
        qq = torch.where(pad.unsqueeze(0), z_slots, torch.zeros_like(z_slots))
        qq[:, at] = q[:, order].to(qq.dtype)
        sub_groups = slot_group[::sub]
        s, z = scales[:, sub_groups], zeros[:, sub_groups]
        spec_fn = self.spec
        if self.bits == 4 and bool(pad.any()) and int(z_slots[:, pad].max()) > 15:
            # A zero point of 16 (the original GPTQ format's wrapped zero) has no 4-bit code: hold these as int8.
            sf = s.to(torch.float32)
            part = QuantizedPart(spec_fn(layer, "int8", 8, sub), {
                "qweight": qq.to(torch.int8).contiguous(), "scales": sf.contiguous(),
                "mins": (-sf * z.to(torch.float32)).contiguous(), "perm": perm})
        else:
            if self.bits == 8 and bool(pad.any()) and int(z_slots[:, pad].max()) > 255:
                raise ValueError(f"quantization gptq: layer {self.prefix}: a zero point of 256 cannot pad this "
                                 f"rank's act-order groups; use tensor_parallel_size=1")
            part = _int_weights(layer, spec_fn, qq, s, z, self.bits, sub, perm)
        part.spec = dataclasses.replace(part.spec, in_features=width)
        return part


def _sub_group(counts: torch.Tensor, group: int, bits: int) -> int:
    """The sub-group size that holds a rank's act-order columns in the fewest bytes (weights plus a float32 scale
    and min per sub-group): a divisor of ``group`` that the kernels take (a multiple of 32), or ``group``."""
    candidates = {group} | {d for d in range(32, group, 32) if group % d == 0}
    present = counts[counts > 0]

    def cost(sub: int) -> float:
        width = int(((present + sub - 1) // sub * sub).sum())
        return width * (bits / 8 + 8 / sub)

    return min(sorted(candidates), key=cost)


class AWQLinear(LinearQuantizer):
    method = "awq"

    def __init__(self, prefix: str, group_size: int) -> None:
        super().__init__(prefix)
        self.group_size = group_size

    def params(self, layer: Linear, dtype: torch.dtype) -> dict[str, QParam]:
        n, k = layer.out_features, layer.in_features
        if k % self.group_size:
            raise ValueError(input_unit_refusal(self.method, self.prefix, layer, self.group_size, "group_size"))
        groups, by_group = k // self.group_size, (self.group_size, 1)
        return {"qweight": QParam((k, n // 8), torch.int32, out_dim=1, out_pack=8, in_dim=0),
                "qzeros": QParam((groups, n // 8), torch.int32, out_dim=1, out_pack=8, in_dim=0, in_unit=by_group),
                "scales": QParam((groups, n), torch.float32, out_dim=1, in_dim=0, in_unit=by_group)}

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
        return GPTQLinear(prefix, self.bits, self.group_size, self.zero_offset, self.desc_act)

    def input_unit(self, prefix: str, in_features: int) -> tuple[int, str] | None:
        if self.group_size == -1 or self.desc_act:  # no group is cut: scales per channel, or held whole
            return 32 // self.bits, "int32 packing"
        return self.group_size, "group_size"


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

    def input_unit(self, prefix: str, in_features: int) -> tuple[int, str] | None:
        return None if _skipped(prefix, [prefix], self.skip) else (self.group_size, "group_size")
