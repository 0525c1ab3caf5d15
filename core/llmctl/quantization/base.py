"""The linear-method seam: a checkpoint's quantization config hands each linear layer a ``LinearQuantizer``
that creates the layer's parameters under the checkpoint's tensor names (so the model's own ``load_weights``
fills them without knowing the format), writes merged shards, and at the end of loading unpacks them into one of
core's weight formats (``QuantLinearSpec``), whose matmul a platform kernel runs."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmctl.plugins.types import QuantLinearSpec

if TYPE_CHECKING:
    from llmctl.layers.linear import Linear
    from llmctl.models.moe import SparseMoE
    from llmctl.quantization.moe import MoEQuantMethod

# Fused projection -> the checkpoint projections it stacks, for models that do not say (vLLM's
# ``packed_modules_mapping``; a model class may define its own attribute of that name).
DEFAULT_PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


@dataclass(frozen=True)
class QParam:
    """One checkpoint tensor of a quantized layer. ``out_dim`` is the dim that runs along the layer's outputs
    (shards of a merged layer are written at their offsets along it, divided by ``out_pack`` outputs per
    element); ``None`` means one value per checkpoint projection, stacked on a leading shard dim when merged."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    out_dim: int | None = 0
    out_pack: int = 1
    # The dim that runs along the layer's inputs, split by a row-parallel layer, and its unit: ``in_unit[0]`` input
    # columns take ``in_unit[1]`` entries along it (a group of 128 columns one scale, 8 4-bit values one int32,
    # 256 values of a Q4_K super-block 144 bytes). None: not split (one value per row, or the whole input).
    in_dim: int | None = None
    in_unit: tuple[int, int] = (1, 1)


@dataclass
class QuantizedPart:
    """What a finished layer (or one shard of it, when its shards' formats differ) runs on."""

    spec: QuantLinearSpec
    weights: dict[str, torch.Tensor]
    out_slice: slice | None = None  # the rows of the layer's bias this part owns (None: all)


class LinearQuantizer(abc.ABC):
    """One layer's quantization, from parameter creation to the format-level tensors."""

    method: str = ""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    @abc.abstractmethod
    def params(self, layer: Linear, dtype: torch.dtype) -> dict[str, QParam]:
        """Checkpoint tensor name (after the layer prefix) -> how it is stored; ``dtype`` is the model's."""

    def create_weights(self, layer: Linear, dtype: torch.dtype, device: torch.device) -> None:
        """Uninitialised storage (pages are committed as the loader writes them); the model's completeness check
        guarantees every tensor is written."""
        from llmctl.quantization.sharding import check_output_split

        merged = getattr(layer, "output_sizes", None)
        self._params = self.params(layer, dtype)
        for name, p in self._params.items():
            check_output_split(self.method, self.prefix, layer, p, name)
            shape = p.shape if p.out_dim is not None or merged is None else (len(merged), *p.shape)
            setattr(layer, name, nn.Parameter(torch.empty(shape, dtype=p.dtype, device=device), requires_grad=False))

    def param_names(self) -> list[str]:
        return list(self._params)

    def expected_shape(self, layer: Linear, name: str, shard: int | None) -> tuple[int, ...] | None:
        """The shape checkpoint tensor ``name`` of one projection must have (the whole projection, also on a
        tensor-parallel rank that reads a part of it); None when the layout has no such tensor, ``()`` when the
        quantizer checks it itself."""
        from llmctl.quantization.sharding import checkpoint_shape

        p = self._params.get(name)
        if p is None:
            return None
        return checkpoint_shape(layer, p, shard)

    def read_part(self, layer: Linear, name: str, shard: int | None, tensor: Any) -> torch.Tensor:
        """This rank's part of checkpoint tensor ``name`` (all of it without tensor parallelism)."""
        from llmctl.quantization.sharding import rank_slice, read_rank_part

        p = self._params[name]
        return read_rank_part(tensor, rank_slice(layer, p, shard))

    def load_param(self, layer: Linear, name: str, tensor: Any, ckpt_name: str) -> None:
        """An unmerged layer's tensor (a row-parallel rank reads its input columns of it)."""
        if name not in self._params:
            raise ValueError(f"quantization {self.method}: tensor {ckpt_name} is not part of this method's layout")
        part = self.read_part(layer, name, None, tensor)
        dst: torch.Tensor = getattr(layer, name).data
        if tuple(dst.shape) != tuple(part.shape):
            raise ValueError(f"quantization {self.method}: tensor {ckpt_name} gives this rank shape "
                             f"{tuple(part.shape)}, expected {tuple(dst.shape)} for this layer's config")
        dst.copy_(part)

    def load_shard(self, layer: Linear, name: str, shard: int, tensor: Any, ckpt_name: str) -> None:
        p = self._params.get(name)
        if p is None:
            raise ValueError(f"quantization {self.method}: tensor {ckpt_name} is not part of this method's layout")
        tensor = self.read_part(layer, name, shard, tensor)
        dst: torch.Tensor = getattr(layer, name).data
        if p.out_dim is None:
            dst = dst[shard]
        else:
            offsets, sizes = layer.offsets, layer.output_sizes  # type: ignore[attr-defined]
            if offsets[shard] % p.out_pack or sizes[shard] % p.out_pack:
                raise ValueError(f"quantization {self.method}: tensor {ckpt_name}: projection width "
                                 f"{sizes[shard]} is not a multiple of {p.out_pack} (its packing)")
            dst = dst.narrow(p.out_dim, offsets[shard] // p.out_pack, sizes[shard] // p.out_pack)
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(f"quantization {self.method}: tensor {ckpt_name} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(dst.shape)} for this layer's config")
        dst.copy_(tensor)

    def fused_parts(self, name: str, tensor: Any, sizes: Sequence[int]) -> list[Any]:
        """Each projection's share of checkpoint tensor ``name`` stored once for a fused projection (Phi-3's
        qkv_proj) where it holds no output dim (``QParam.out_dim`` None): a per-tensor scale holds for every part."""
        return [tensor] * len(sizes)

    @abc.abstractmethod
    def finish(self, layer: Linear) -> list[QuantizedPart]:
        """After loading: the layer's tensors in a core weight format (usually one part)."""

    def take(self, layer: Linear, name: str) -> torch.Tensor:
        """A loaded checkpoint tensor, removed from the layer (its memory goes with the last reference)."""
        t = getattr(layer, name).data
        delattr(layer, name)
        return t

    def spec(self, layer: Linear, fmt: str, bits: int, group_size: int, act: str | None = None,
             ggml_type: str | None = None) -> QuantLinearSpec:
        return QuantLinearSpec(format=fmt, in_features=layer.in_features, out_features=layer.out_features,
                               bits=bits, group_size=group_size, act=act, ggml_type=ggml_type, layer=self.prefix)


class QuantConfig(abc.ABC):
    """A checkpoint's (or ``--quantization``'s) quantization: which layers it covers and how each is stored."""

    name: str = ""

    @abc.abstractmethod
    def linear_quantizer(self, prefix: str, layer: Linear, shard_names: Sequence[str]) -> LinearQuantizer | None:
        """The layer's quantizer, or None to leave it unquantized. ``shard_names`` are the checkpoint prefixes of
        the projections the layer stacks (just ``prefix`` for an unmerged layer)."""

    def describe(self) -> str:
        return self.name

    def use_module_names(self, module_name: Callable[[str], str]) -> None:
        """Before the model's layers ask for their quantizers: ``module_name`` maps a checkpoint tensor name to the
        model's name for it (the family's renames), for a config that keys layers by checkpoint tensor names."""

    def moe_method(self, prefix: str, moe: SparseMoE) -> MoEQuantMethod | None:
        """The routed experts' method (vLLM's ``get_quant_method`` for a ``FusedMoE``), or None to leave them in
        the model dtype. By default each expert is held as this config's linear layers are, where the config
        covers the experts' projections (an ``ignore``/``modules_to_not_convert`` entry leaves them dense)."""
        from llmctl.quantization.moe import CheckpointExperts

        method = CheckpointExperts(prefix, self)
        return method if method.expert_layers(moe, moe.local_experts()[0]) is not None else None

    def input_unit(self, prefix: str, in_features: int) -> tuple[int, str] | None:
        """The input columns of layer ``prefix`` that must stay together on one rank when a row-parallel split
        cuts its inputs (a group, a packed word, a block), and what to call them; None when the layer is not
        quantized or any cut will do."""
        return None

    def lm_head_part(self, vocab_size: int, hidden_size: int) -> QuantizedPart | None:
        """The output projection as the checkpoint stores it quantized, where the method keeps it so; None leaves
        the head in the model dtype. Why: at one sequence a decode step reads the whole head, and in float32 a
        small model's head is more bytes than all its quantized layers together."""
        return None

    def extra(self) -> dict[str, Any]:
        return {}
