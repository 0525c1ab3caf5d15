"""Routed experts kept quantized: a method per quantization, in vLLM's shape (``FusedMoEMethodBase``): create the
experts' weights before loading, take the checkpoint's tensors, process them after loading, apply.

Each expert's gate/up and down projections are held as the method's own linear layers would be: the config's
``LinearQuantizer`` creates, loads and unpacks them (so every checkpoint format's unpacking, shape checks and
tensor-parallel cuts are the linear layers' code, not a copy), and each expert's parts are bound to the platform's
kernel for their weight format (``select_kernel``: a plugin's, else core's torch reference). ``apply`` visits the
experts that received rows in ascending order, runs each one's projections through those kernels and adds the
weighted results in the hidden dtype: the order and roundings of the ``fused_moe`` reference, with the quantized
matmul in place of the dense one.

Two families of methods:

- :class:`CheckpointExperts` (compressed-tensors, GPTQ, AWQ): the checkpoint stores every expert's projections
  in the format (``experts.{e}.gate_proj.weight_packed``...). Under tensor parallelism each expert's gate/up is
  column-parallel and its down projection row-parallel, so a rank reads its intermediate columns of the packed
  weights with their scales, zeros and ``g_idx``, and a split that would cut a group or a packed word is refused
  naming ``tensor_parallel_size``. Under expert parallelism a rank holds its experts whole and never reads another
  rank's.
- :class:`LoadTimeExperts` (``--quantization int8|fp8``): the experts load dense into the layer's stacks, then each
  expert's projections are quantized per output channel (as vLLM's dynamic fp8 MoE does), a row-parallel rank's
  down rows scaled by the whole row's maximum.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from llmctl.plugins.types import QuantLinearSpec
from llmctl.quantization.base import QuantizedPart
from llmctl.quantization.layers import check_tensor

if TYPE_CHECKING:
    from llmctl.layers.linear import Linear
    from llmctl.models.moe import SparseMoE
    from llmctl.quantization.base import QuantConfig

# A bound projection: (kernel, its processed weights, QuantLinearSpec, output rows) per part, as Linear keeps them.
BoundParts = list[tuple[Any, dict[str, torch.Tensor], QuantLinearSpec, slice | None]]

# The methods whose routed experts stay quantized, and how they run (what ``llmctl doctor`` says); GGUF MoE files
# load their experts dequantized.
MOE_METHODS = ("compressed-tensors", "gptq", "awq", "int8", "fp8")
MOE_KERNEL = "a per-expert loop over each weight format's linear kernel, in fused_moe's summation order"

_QEXPERT = re.compile(r"^(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The experts' activation, as the ``fused_moe`` reference picks it."""
    if name in ("silu", "swish"):
        return F.silu
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def run_parts(parts: BoundParts, x: torch.Tensor) -> torch.Tensor:
    """One projection through its kernel(s): several parts (shards whose formats differ) are concatenated."""
    if len(parts) == 1:
        kernel, weights, spec, _ = parts[0]
        return kernel.apply(x, weights, None, spec)
    return torch.cat([kernel.apply(x, weights, None, spec) for kernel, weights, spec, _ in parts], dim=-1)


@dataclass
class ExpertPart:
    """What :meth:`MoEQuantMethod.finish` gives for one local expert: its projections in core weight formats."""

    gate_up: list[QuantizedPart]
    down: list[QuantizedPart]


class MoEQuantMethod(abc.ABC):
    """One MoE layer's quantized experts, from creation to the per-step apply."""

    method: str = ""
    reads_checkpoint = False  # True: the checkpoint's expert tensors are in the format and come to ``load``

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.experts: list[tuple[BoundParts, BoundParts]] = []  # per local expert, after ``bind``
        self.act: Callable[[torch.Tensor], torch.Tensor] = F.silu
        self.inter = 0

    def create_weights(self, moe: SparseMoE) -> None:
        """Before loading (the layer's own dense stacks are left as they are unless the method replaces them)."""
        self.act = activation(moe.act)
        self.inter = moe.local_intermediate

    def load(self, moe: SparseMoE, rest: str, tensor: Any, name: str) -> None:
        raise NotImplementedError

    def missing(self, moe: SparseMoE, down: bool) -> list[str]:
        return []

    @abc.abstractmethod
    def finish(self, moe: SparseMoE) -> list[ExpertPart]:
        """After loading: each local expert's projections in core weight formats."""

    def apply(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """``fused_moe``'s contract (local expert ids) on the quantized experts, in its summation order."""
        out = torch.zeros_like(hidden)
        inter = self.inter
        for e in torch.unique(topk_ids).tolist():
            rows, slot = torch.where(topk_ids == e)
            gate_up, down = self.experts[e]
            h = run_parts(gate_up, hidden[rows])
            h = run_parts(down, self.act(h[:, :inter]) * h[:, inter:])
            out.index_add_(0, rows, (h * topk_weights[rows, slot, None]).to(hidden.dtype))
        return out


class CheckpointExperts(MoEQuantMethod):
    """Experts stored quantized, each projection held and unpacked by the config's linear quantizer."""

    reads_checkpoint = True

    def __init__(self, prefix: str, config: QuantConfig) -> None:
        super().__init__(prefix)
        self.config = config
        self.method = config.name
        self.layers: list[tuple[Linear, Linear]] = []  # per local expert: (gate_up, down) until finished
        self.loaded: set[tuple[int, str, str]] = set()

    def expert_layers(self, moe: SparseMoE, e: int) -> tuple[Linear, Linear] | None:
        """Expert ``e``'s gate/up (column-parallel) and down (row-parallel) holders with their quantizers, or
        None where the config leaves the expert unquantized (an ``ignore`` entry)."""
        from llmctl.layers.parallel import MergedColumnParallelLinear, RowParallelLinear
        from llmctl.tensor_parallel import SINGLE

        tp = SINGLE if moe.placement is not None else moe.tp  # expert parallelism: whole experts
        full, h = moe.spec.intermediate_size, moe.hidden_size
        kw = dict(bias=False, dtype=moe.dtype, device=moe.device, tp=tp)
        gate_up = MergedColumnParallelLinear(h, [full, full], **kw)
        down = RowParallelLinear(full, h, what="moe_intermediate_size", **kw)
        base = f"{self.prefix}.experts.{e}"
        qg = self.config.linear_quantizer(f"{base}.gate_up_proj", gate_up, [f"{base}.gate_proj", f"{base}.up_proj"])
        qd = self.config.linear_quantizer(f"{base}.down_proj", down, [f"{base}.down_proj"])
        if qg is None and qd is None:
            return None
        if qg is None or qd is None:
            raise ValueError(f"quantization {self.method}: expert {base} quantizes only some of its projections; "
                             f"llmctl keeps an expert's projections quantized alike (all, or none through ignore)")
        gate_up.set_quantizer(qg)
        down.set_quantizer(qd)
        return gate_up, down

    def create_weights(self, moe: SparseMoE) -> None:
        super().create_weights(moe)
        for e in moe.local_experts():
            layers = self.expert_layers(moe, e)
            if layers is None:
                raise ValueError(f"quantization {self.method}: expert {self.prefix}.experts.{e} is left unquantized "
                                 f"while expert {moe.local_experts()[0]} is not; a layer's experts must be alike")
            self.layers.append(layers)

    def _target(self, moe: SparseMoE, rest: str, name: str) -> tuple[int, str, str] | None:
        m = _QEXPERT.match(rest)
        if m is None or int(m.group(1)) >= moe.spec.num_experts:
            raise ValueError(f"quantization {self.method}: checkpoint tensor {name} has no place in the "
                             f"mixture-of-experts layer {self.prefix} (its experts are stored per expert, "
                             f"experts.{{e}}.gate_proj|up_proj|down_proj.<{self.method} tensor>)")
        e = int(m.group(1))
        if moe.placement is not None and not moe.placement.owns(e):
            return None  # another rank's expert: never read
        return e, m.group(2), m.group(3)

    def load(self, moe: SparseMoE, rest: str, tensor: Any, name: str) -> None:
        target = self._target(moe, rest, name)
        if target is None:
            return
        e, proj, leaf = target
        gate_up, down = self.layers[e - moe.local_experts()[0]]
        layer, shard = (down, None) if proj == "down_proj" else (gate_up, 0 if proj == "gate_proj" else 1)
        quantizer = layer.quantizer
        assert quantizer is not None
        check_tensor(self.method, layer, leaf, shard, tensor, name, f"expert {self.prefix}.experts.{e}.{proj}",
                     list(quantizer.param_names()))
        param = getattr(layer, leaf)
        if shard is None:
            layer.load_param(param, tensor, name)  # type: ignore[attr-defined]
        else:
            layer.load_shard(param, shard, tensor, name)  # type: ignore[attr-defined]
        self.loaded.add((e, proj, leaf))

    def missing(self, moe: SparseMoE, down: bool) -> list[str]:
        out = []
        for e, (gate_up, dn) in zip(moe.local_experts(), self.layers, strict=True):
            layer = dn if down else gate_up
            assert layer.quantizer is not None
            for proj in (("down_proj",) if down else ("gate_proj", "up_proj")):
                out += [f"{self.prefix}.experts.{e}.{proj}.{leaf}" for leaf in layer.quantizer.param_names()
                        if (e, proj, leaf) not in self.loaded]
        return out

    def finish(self, moe: SparseMoE) -> list[ExpertPart]:
        parts = []
        for gate_up, down in self.layers:
            assert gate_up.quantizer is not None and down.quantizer is not None
            parts.append(ExpertPart(gate_up.quantizer.finish(gate_up), down.quantizer.finish(down)))
        self.layers = []
        return parts


class LoadTimeExperts(MoEQuantMethod):
    """``--quantization int8|fp8``: the dense experts quantized per output channel once loading ends."""

    def __init__(self, prefix: str, method: str) -> None:
        super().__init__(prefix)
        self.method = method

    def finish(self, moe: SparseMoE) -> list[ExpertPart]:
        from llmctl.quantization.load_time import quantize_fp8_per_channel, quantize_int8_per_channel

        quantize = quantize_int8_per_channel if self.method == "int8" else quantize_fp8_per_channel
        w13, w2 = moe.w13.data, moe.w2.data
        down_amax = None
        if moe.placement is None and moe.tp.size > 1:
            # A rank holds some columns of every down row: the scale is the whole row's, as with one rank.
            local = w2.to(torch.float32).abs().amax(dim=2, keepdim=True)  # [E, H, 1]
            down_amax = moe.tp.all_gather(local, dim=2).amax(dim=2, keepdim=True)
        parts = []
        h, two_i = w13.shape[2], w13.shape[1]
        act = "fp8" if self.method == "fp8" else None
        fmt = self.method
        for local, e in enumerate(moe.local_experts()):
            base = f"{self.prefix}.experts.{e}"
            q13, s13 = quantize(w13[local])
            q2, s2 = quantize(w2[local], None if down_amax is None else down_amax[local])
            parts.append(ExpertPart(
                [QuantizedPart(QuantLinearSpec(fmt, h, two_i, 8, h, act=act, layer=f"{base}.gate_up_proj"),
                               {"qweight": q13, "scales": s13})],
                [QuantizedPart(QuantLinearSpec(fmt, two_i // 2, h, 8, two_i // 2, act=act, layer=f"{base}.down_proj"),
                               {"qweight": q2, "scales": s2})]))
        return parts


def bind_experts(method: MoEQuantMethod, parts: list[ExpertPart],
                 bind: Callable[[list[QuantizedPart]], BoundParts]) -> None:
    method.experts = [(bind(p.gate_up), bind(p.down)) for p in parts]


__all__ = ["MOE_KERNEL", "MOE_METHODS", "CheckpointExperts", "ExpertPart", "LoadTimeExperts", "MoEQuantMethod",
           "bind_experts", "run_parts"]
