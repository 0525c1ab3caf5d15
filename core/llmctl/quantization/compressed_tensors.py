"""compressed-tensors checkpoints (what llm-compressor writes and vLLM loads), as its compressors store them:

- ``pack-quantized`` (W4A16, W8A16; group or channel, symmetric or not): ``weight_packed`` int32 ``[N, K*b/32]``
  (values offset by ``2**(b-1)`` to unsigned, lowest bits first along K), ``weight_scale`` ``[N, G]``,
  ``weight_zero_point`` int32 ``[N*b/32, G]`` packed along N (asymmetric only), ``weight_shape`` ``[2]``;
  weight = ``scale * (q - zero_point)`` on the signed values.
- ``int-quantized`` (W8A8 int8): ``weight`` int8 ``[N, K]`` and ``weight_scale`` ``[N, 1]``; activations
  quantized per token at run time.
- ``float-quantized`` (FP8): ``weight`` float8_e4m3fn, ``weight_scale`` ``[N, 1]`` or ``[1]`` (per tensor), and
  ``input_scale`` ``[1]`` for static per-tensor activations.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from llmctl.layers._params import materialize
from llmctl.quantization.base import LinearQuantizer, QParam, QuantConfig, QuantizedPart
from llmctl.quantization.packing import groups_to_int4, unpack_int32
from llmctl.quantization.sharding import input_unit_refusal, rank_split

if TYPE_CHECKING:
    from llmctl.layers.linear import Linear

_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class CTScheme:
    group: str  # the config group's name, for messages
    format: str
    bits: int
    weight_type: str  # "int" or "float"
    strategy: str  # "group", "channel" or "tensor"
    group_size: int | None
    symmetric: bool
    act: str | None  # None, "int8" (dynamic per token) or "fp8"
    act_static: bool  # fp8 activations with a stored input_scale


def _scheme(group: str, spec: dict[str, Any], default_format: str) -> CTScheme:
    where = f"quantization compressed-tensors: config group {group}"
    w = spec.get("weights") or {}
    a = spec.get("input_activations")
    fmt = spec.get("format") or default_format
    if fmt not in _FORMATS:
        raise ValueError(f"{where}: format {fmt!r} is not supported; supported: {', '.join(_FORMATS)}")
    wtype, bits, strategy = w.get("type", "int"), int(w.get("num_bits", 0)), w.get("strategy")
    group_size = w.get("group_size")
    if wtype == "int" and bits not in (4, 8):
        raise ValueError(f"{where}: weights num_bits={bits} is not supported; supported: 4, 8")
    if wtype == "float" and bits != 8:
        raise ValueError(f"{where}: float weights num_bits={bits} is not supported; supported: 8 (fp8 e4m3)")
    if wtype not in ("int", "float"):
        raise ValueError(f"{where}: weights type {wtype!r} is not supported; supported: int, float")
    if strategy not in ("group", "channel", "tensor"):
        raise ValueError(f"{where}: weights strategy {strategy!r} is not supported; supported: group, channel, "
                         f"tensor")
    if strategy == "group" and group_size not in _GROUP_SIZES:
        raise ValueError(f"{where}: weights group_size={group_size} is not supported; supported: "
                         f"{', '.join(map(str, _GROUP_SIZES))}")
    if strategy == "tensor" and wtype == "int":
        raise ValueError(f"{where}: per-tensor int weights are not supported; use channel or group")
    act, static = None, False
    if a is not None:
        atype, abits = a.get("type", "int"), int(a.get("num_bits", 0))
        if atype == "int" and abits == 8 and a.get("dynamic") and a.get("strategy") == "token" and a.get(
                "symmetric", True) and wtype == "int" and bits == 8 and strategy == "channel" and w.get("symmetric"):
            act = "int8"
        elif atype == "float" and abits == 8 and wtype == "float":
            act = "fp8"
            static = not a.get("dynamic")
            if static and a.get("strategy") != "tensor":
                raise ValueError(f"{where}: static fp8 activations are supported per tensor only")
        else:
            raise ValueError(f"{where}: input_activations {atype}{abits} ({a.get('strategy')}, dynamic="
                             f"{a.get('dynamic')}) with {wtype}{bits} {strategy} weights is not supported; supported: "
                             f"W4A16/W8A16 int, W8A8 int8 (channel weights, dynamic per-token activations), FP8")
    if wtype == "int" and act is None and fmt != "pack-quantized":
        raise ValueError(f"{where}: weight-only int weights are read in the pack-quantized format, not {fmt!r}")
    return CTScheme(group, fmt, bits, wtype, strategy, int(group_size) if group_size else None,
                    bool(w.get("symmetric", True)), act, static)


def _matches(target: str, name: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target or name.endswith("." + target) or target == "Linear"


class CompressedTensorsLinear(LinearQuantizer):
    method = "compressed-tensors"

    def __init__(self, prefix: str, scheme: CTScheme) -> None:
        super().__init__(prefix)
        self.s = scheme

    def _groups(self, layer: Linear) -> int:
        s, k = self.s, layer.in_features
        if s.format == "pack-quantized" and k % (32 // s.bits):
            raise ValueError(input_unit_refusal(self.method, self.prefix, layer, 32 // s.bits, "int32 packing"))
        if s.strategy != "group":
            return 1
        if k % (s.group_size or 1):
            raise ValueError(input_unit_refusal(self.method, self.prefix, layer, s.group_size or 1, "group_size"))
        return k // (s.group_size or 1)

    def params(self, layer: Linear, dtype: torch.dtype) -> dict[str, QParam]:
        s, n, k = self.s, layer.out_features, layer.in_features
        g = self._groups(layer)
        group_dim = 1 if s.strategy == "group" else None  # per channel or tensor: nothing to cut along the inputs
        by_group = (s.group_size or 1, 1)
        if s.format == "pack-quantized":
            per = 32 // s.bits
            out = {"weight_packed": QParam((n, k // per), torch.int32, in_dim=1, in_unit=(per, 1)),
                   "weight_scale": QParam((n, g), torch.float32, in_dim=group_dim, in_unit=by_group),
                   "weight_shape": QParam((2,), torch.int64, out_dim=None)}
            if not s.symmetric:
                out["weight_zero_point"] = QParam((n // per, g), torch.int32, out_pack=per, in_dim=group_dim,
                                                  in_unit=by_group)
            return out
        wdtype = torch.int8 if s.weight_type == "int" else torch.float8_e4m3fn
        out = {"weight": QParam((n, k), wdtype, in_dim=1)}
        out["weight_scale"] = (QParam((1,), torch.float32, out_dim=None) if s.strategy == "tensor"
                               else QParam((n, 1), torch.float32))
        if s.act_static:
            out["input_scale"] = QParam((1,), torch.float32, out_dim=None)
        return out

    def fused_parts(self, name: str, tensor: Any, sizes: Sequence[int]) -> list[Any]:
        """A fused projection's ``weight_shape`` states the whole stack; each part states its own rows."""
        if name != "weight_shape":
            return super().fused_parts(name, tensor, sizes)
        shape = materialize(tensor).reshape(-1)
        if int(shape[0]) != sum(sizes):
            raise ValueError(f"quantization compressed-tensors: layer {self.prefix}: weight_shape {shape.tolist()} "
                             f"does not stack projections of {list(sizes)} rows")
        return [torch.tensor([size, int(shape[1])], dtype=shape.dtype) for size in sizes]

    def finish(self, layer: Linear) -> list[QuantizedPart]:
        s, n, k = self.s, layer.out_features, layer.in_features
        sizes = getattr(layer, "output_sizes", None) or [n]
        if s.format == "pack-quantized":
            return [self._finish_packed(layer, sizes)]
        w = self.take(layer, "weight")
        scale = self.take(layer, "weight_scale")
        if s.strategy == "tensor":  # one scale per checkpoint projection -> the same value on each of its rows
            scale = torch.cat([scale.reshape(-1)[i].expand(size) for i, size in enumerate(sizes)]).reshape(n, 1)
        weights = {"qweight": w.contiguous(), "scales": scale.to(torch.float32).contiguous()}
        if s.act_static:
            # As vLLM does for merged layers: the largest of the projections' activation scales.
            weights["input_scale"] = self.take(layer, "input_scale").reshape(-1).amax().reshape(1)
        fmt = "int8" if s.weight_type == "int" else "fp8"
        return [QuantizedPart(self.spec(layer, fmt, 8, k, act=s.act), weights)]

    def _finish_packed(self, layer: Linear, sizes: Sequence[int]) -> QuantizedPart:
        s, k = self.s, layer.in_features
        shapes = self.take(layer, "weight_shape").reshape(-1, 2).tolist()
        split = rank_split(layer)
        if split is not None:  # the checkpoint states the whole projection; this rank holds a part of it
            sizes = getattr(layer, "full_output_sizes", None) or sizes
            k = k * split[1] if split[2] == "input" else k
        for size, shape in zip(sizes, shapes, strict=True):
            if tuple(shape) != (size, k):
                raise ValueError(f"quantization compressed-tensors: layer {self.prefix}: weight_shape {shape} does "
                                 f"not match the model's projection ({size}, {k})")
        k = layer.in_features
        offset = 1 << (s.bits - 1)
        u = unpack_int32(self.take(layer, "weight_packed"), s.bits, dim=1)  # unsigned: signed value + offset
        scale = self.take(layer, "weight_scale").to(torch.float32)
        if s.symmetric:
            zu = None
        else:
            zu = unpack_int32(self.take(layer, "weight_zero_point"), s.bits, dim=0)
        group = s.group_size if s.strategy == "group" else k
        if s.bits == 4:
            zeros = torch.full_like(scale, float(offset)) if zu is None else zu
            return QuantizedPart(self.spec(layer, "int4", 4, group), groups_to_int4(u, scale, zeros))
        weights = {"qweight": (u - offset).to(torch.int8).contiguous(), "scales": scale.contiguous()}
        if zu is not None:
            weights["mins"] = (-scale * (zu - offset).to(torch.float32)).contiguous()
        return QuantizedPart(self.spec(layer, "int8", 8, group), weights)


class CompressedTensorsConfig(QuantConfig):
    name = "compressed-tensors"

    def __init__(self, groups: list[tuple[list[str], CTScheme]], ignore: list[str]) -> None:
        self.groups = groups
        self.ignore = ignore

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> CompressedTensorsConfig:
        if qc.get("sparsity_config"):
            raise ValueError("quantization compressed-tensors: sparsity_config (sparse checkpoints) is not supported")
        default_format = qc.get("format") or "pack-quantized"
        groups = []
        for name, spec in (qc.get("config_groups") or {}).items():
            groups.append((list(spec.get("targets") or []), _scheme(name, spec, default_format)))
        if not groups:
            raise ValueError("quantization compressed-tensors: quantization_config has no config_groups")
        return cls(groups, list(qc.get("ignore") or []))

    def describe(self) -> str:
        schemes = sorted({f"{s.weight_type}{s.bits} {s.strategy}" + (f"{s.group_size}" if s.group_size else "") +
                          (f" a-{s.act}" if s.act else "") for _, s in self.groups})
        return f"compressed-tensors ({', '.join(schemes)})"

    def _scheme_for(self, name: str) -> CTScheme | None:
        if any(_matches(t, name) and t != "Linear" for t in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(_matches(t, name) for t in targets):
                return scheme
        return None

    def linear_quantizer(self, prefix: str, layer: Linear, shard_names: Sequence[str]) -> LinearQuantizer | None:
        schemes = [self._scheme_for(n) for n in shard_names]
        if any(s != schemes[0] for s in schemes):
            raise ValueError(f"quantization compressed-tensors: layer {prefix} stacks projections with different "
                             f"schemes ({', '.join(shard_names)}); they must be quantized alike")
        return None if schemes[0] is None else CompressedTensorsLinear(prefix, schemes[0])

    def input_unit(self, prefix: str, in_features: int) -> tuple[int, str] | None:
        s = self._scheme_for(prefix)
        if s is None or s.format != "pack-quantized":
            return None
        if s.strategy == "group":
            return s.group_size or 1, "group_size"
        return 32 // s.bits, "int32 packing"
