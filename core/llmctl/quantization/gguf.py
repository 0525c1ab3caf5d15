"""GGUF kept quantized: llama.cpp's blocks are loaded as stored and unpacked, exactly, into core's weight
formats where one holds them (Q4_0/Q4_1/Q4_K -> int4, Q8_0/Q5_0/Q5_1/Q5_K -> int8, group 32; Q6_K -> int8,
group 16), so the platforms' group kernels run them; the other block types (Q2_K, Q3_K, ...) stay as blocks in
the ``gguf`` format, whose reference dequantizes them with the gguf package's own dequantizer.

Block layouts (little-endian, 32 weights per block, ``d``/``m`` float16): Q4_0 ``d, qs[16]`` with ``w = d (q - 8)``;
Q4_1 ``d, m, qs[16]`` with ``w = d q + m``; Q5_0 ``d, qh[4], qs[16]`` with ``w = d (q - 16)``; Q5_1 ``d, m, qh[4],
qs[16]`` with ``w = d q + m``; Q8_0 ``d, qs[32]`` (int8) with ``w = d q``. In the 4/5-bit types weight ``j < 16``
is the low nibble of ``qs[j]`` and weight ``j + 16`` its high nibble; bit ``j`` of ``qh`` is weight ``j``'s fifth bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from llmctl.quantization.base import LinearQuantizer, QParam, QuantConfig, QuantizedPart
from llmctl.quantization.packing import pack_nibbles
from llmctl.quantization.sharding import checkpoint_shape, input_unit_refusal, rank_slice, read_rank_part

if TYPE_CHECKING:
    from llmctl.layers.linear import Linear
    from llmctl.loader.gguf_file import GGUFFile

# Plain (not block-quantized) ggml types: such tensors are dequantized at load like before.
PLAIN_TYPES = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})
# llama.cpp block projections whose weights stay quantized.
# llama.cpp's projection tensors (``attn_qkv``: Phi-3's fused q/k/v; ``ffn_up`` holds Phi-3's fused gate/up).
LINEAR_BLOCK_TENSORS = frozenset({"attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up",
                                  "ffn_down"})
_BLOCK = 32


def block_bytes(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block)."""
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]


def dequantize_blocks(qweight: torch.Tensor, type_name: str, in_features: int) -> torch.Tensor:
    """float32 [N, K] from raw blocks, by the gguf package's dequantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    out = dequantize(qweight.cpu().numpy(), GGMLQuantizationType[type_name])
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(qweight.shape[0], in_features).to(qweight.device)


def _fp16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    return blocks[..., at:at + 2].contiguous().view(torch.float16).to(torch.float32).squeeze(-1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] values in weight order (low nibbles are weights 0..15)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """[..., 4] bytes (a little-endian u32) -> [..., 32] bits, bit j for weight j."""
    bits = (qh.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.flatten(-2)


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit sub-block scales and mins -> ([..., 8], [..., 8]) float32."""
    q = packed.to(torch.int32)
    sc = torch.cat((q[..., 0:4] & 63, (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)), dim=-1)
    m = torch.cat((q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)), dim=-1)
    return sc.to(torch.float32), m.to(torch.float32)


def _convert_k_quant(b: torch.Tensor, type_name: str, n: int, k: int) -> tuple[str, dict[str, torch.Tensor], int]:
    """Super-blocks of 256 -> core's group formats, exactly: Q4_K -> int4 and Q5_K -> int8, groups of 32 with
    scale ``d * sc`` and min ``-dmin * m``; Q6_K -> int8 groups of 16 with scale ``d * sc`` (llama.cpp's
    dequantizers' own products, so the weights are the same floats)."""
    if type_name == "Q6_K":
        ql, qh, d = b[..., 0:128].to(torch.int32), b[..., 128:192].to(torch.int32), _fp16(b, 208)
        sc = b[..., 192:208].contiguous().view(torch.int8).to(torch.float32)  # [..., 16]
        halves = []
        for h in range(2):
            lo, hi = ql[..., 64 * h:64 * h + 32], ql[..., 64 * h + 32:64 * h + 64]
            bits = qh[..., 32 * h:32 * h + 32]
            halves += [(lo & 0xF) | ((bits & 3) << 4), (hi & 0xF) | (((bits >> 2) & 3) << 4),
                       (lo >> 4) | (((bits >> 4) & 3) << 4), (hi >> 4) | (((bits >> 6) & 3) << 4)]
        q = (torch.cat(halves, dim=-1) - 32).to(torch.int8)
        return "int8", {"qweight": q.reshape(n, k), "scales": (d.unsqueeze(-1) * sc).reshape(n, k // 16)}, 16
    d, dmin = _fp16(b, 0), _fp16(b, 2)
    sc, m = _k_scales_mins(b[..., 4:16])
    scales = (d.unsqueeze(-1) * sc).reshape(n, k // 32)
    mins = -(dmin.unsqueeze(-1) * m).reshape(n, k // 32)
    if type_name == "Q4_K":
        qs = b[..., 16:144].reshape(*b.shape[:-1], 4, 32)
        q = torch.cat((qs & 0xF, qs >> 4), dim=-1).reshape(n, k)  # chunk i: sub-blocks 2i (low), 2i+1 (high)
        return "int4", {"qweight": pack_nibbles(q), "scales": scales, "mins": mins}, 32
    qh = b[..., 16:48].to(torch.int32).unsqueeze(-2)  # Q5_K: [..., 1, 32], bit 2i / 2i+1 for chunk i
    qs = b[..., 48:176].reshape(*b.shape[:-1], 4, 32).to(torch.int32)
    shift = 2 * torch.arange(4, dtype=torch.int32).unsqueeze(-1)
    low = (qs & 0xF) | (((qh >> shift) & 1) << 4)
    high = (qs >> 4) | (((qh >> (shift + 1)) & 1) << 4)
    q = torch.cat((low, high), dim=-1).reshape(n, k).to(torch.int8)
    return "int8", {"qweight": q, "scales": scales, "mins": mins}, 32


K_QUANTS_AS_GROUPS = ("Q4_K", "Q5_K", "Q6_K")


def convert_blocks(raw: torch.Tensor, type_name: str, in_features: int
                   ) -> tuple[str, dict[str, torch.Tensor], int]:
    """Raw blocks [N, row_bytes] -> (core format, its tensors, group size); format ``gguf`` keeps the blocks."""
    n = raw.shape[0]
    if type_name in K_QUANTS_AS_GROUPS:
        _, size = block_bytes(type_name)
        return _convert_k_quant(raw.reshape(n, in_features // 256, size), type_name, n, in_features)
    if type_name not in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        return "gguf", {"qweight": raw.contiguous()}, block_bytes(type_name)[0]
    _, size = block_bytes(type_name)
    b = raw.reshape(n, in_features // _BLOCK, size)
    d = _fp16(b, 0)
    if type_name == "Q8_0":
        q = b[..., 2:].contiguous().view(torch.int8)
        return "int8", {"qweight": q.reshape(n, in_features), "scales": d}, _BLOCK
    if type_name in ("Q4_0", "Q4_1"):
        q = _nibbles(b[..., -16:])
        mins = _fp16(b, 2) if type_name == "Q4_1" else -8.0 * d
        return "int4", {"qweight": pack_nibbles(q.reshape(n, in_features)), "scales": d, "mins": mins}, _BLOCK
    # Q5_0 / Q5_1: five bits do not fit a nibble; held as int8 with the same group scales.
    qh = b[..., -20:-16]
    q = (_nibbles(b[..., -16:]) | (_fifth_bits(qh) << 4)).to(torch.int16)
    if type_name == "Q5_0":
        return "int8", {"qweight": (q - 16).to(torch.int8).reshape(n, in_features), "scales": d}, _BLOCK
    return "int8", {"qweight": q.to(torch.int8).reshape(n, in_features), "scales": d, "mins": _fp16(b, 2)}, _BLOCK


class GGUFLinear(LinearQuantizer):
    method = "gguf"

    def __init__(self, prefix: str, types: Sequence[str]) -> None:
        super().__init__(prefix)
        self.types = list(types)

    def _row_bytes(self, type_name: str, k: int, layer: Linear | None = None) -> int:
        per, size = block_bytes(type_name)
        if k % per:
            if layer is not None:  # a block of 32 or 256 values is never cut: refused, naming the split
                raise ValueError(input_unit_refusal(self.method, self.prefix, layer, per, f"{type_name} block"))
            raise ValueError(f"quantization gguf: layer {self.prefix}: in_features {k} is not a multiple of "
                             f"{type_name}'s block of {per}")
        return k // per * size

    def params(self, layer: Linear, dtype: torch.dtype) -> dict[str, QParam]:
        k, n = layer.in_features, layer.out_features
        if len(set(self.types)) == 1:
            per, size = block_bytes(self.types[0])
            return {"weight": QParam((n, self._row_bytes(self.types[0], k, layer)), torch.uint8, in_dim=1,
                                     in_unit=(per, size))}
        # Shards of different block types (e.g. Q4_K q/k with a Q6_K v): one flat byte buffer, each shard's
        # rows at their own byte offset.
        sizes = layer.output_sizes  # type: ignore[attr-defined]
        total = sum(s * self._row_bytes(t, k, layer) for s, t in zip(sizes, self.types, strict=True))
        return {"weight": QParam((total,), torch.uint8)}

    def expected_shape(self, layer: Linear, name: str, shard: int | None) -> tuple[int, ...] | None:
        if name != "weight":
            return None
        t = self.types[shard or 0]
        per, size = block_bytes(t)
        return checkpoint_shape(layer, QParam((layer.out_features, self._row_bytes(t, layer.in_features)),
                                              torch.uint8, in_dim=1, in_unit=(per, size)), shard)

    def _byte_offsets(self, layer: Linear) -> list[int]:
        sizes = layer.output_sizes  # type: ignore[attr-defined]
        ends = np.cumsum([s * self._row_bytes(t, layer.in_features) for s, t in zip(sizes, self.types, strict=True)])
        return [0, *ends.tolist()]

    def load_shard(self, layer: Linear, name: str, shard: int, tensor: torch.Tensor, ckpt_name: str) -> None:
        if len(set(self.types)) == 1:
            super().load_shard(layer, name, shard, tensor, ckpt_name)
            return
        offsets = self._byte_offsets(layer)
        tensor = read_rank_part(tensor, rank_slice(layer, QParam((0,), torch.uint8), shard))  # this rank's rows
        dst = layer.weight.data[offsets[shard]:offsets[shard + 1]]
        if dst.numel() != tensor.numel() or tensor.dtype != torch.uint8:
            raise ValueError(f"quantization gguf: tensor {ckpt_name} holds {tensor.numel()} bytes of "
                             f"{tensor.dtype}, expected {dst.numel()} bytes of {self.types[shard]}")
        dst.copy_(tensor.reshape(-1))

    def finish(self, layer: Linear) -> list[QuantizedPart]:
        raw = self.take(layer, "weight")
        k = layer.in_features
        if len(set(self.types)) == 1:
            return [self._part(layer, raw, self.types[0], layer.out_features, None)]
        parts, offsets, row = [], self._byte_offsets(layer), 0
        for i, (size, t) in enumerate(zip(layer.output_sizes, self.types, strict=True)):  # type: ignore[attr-defined]
            shard = raw[offsets[i]:offsets[i + 1]].view(size, self._row_bytes(t, k))
            parts.append(self._part(layer, shard, t, size, slice(row, row + size)))
            row += size
        return parts

    def _part(self, layer: Linear, raw: torch.Tensor, type_name: str, n: int, rows: slice | None) -> QuantizedPart:
        from llmctl.plugins.types import QuantLinearSpec

        fmt, weights, group = convert_blocks(raw, type_name, layer.in_features)
        bits = {"int4": 4, "int8": 8}.get(fmt, 0) or int("".join(c for c in type_name[1:3] if c.isdigit()) or 0)
        spec = QuantLinearSpec(format=fmt, in_features=layer.in_features, out_features=n, bits=bits,
                               group_size=group,
                               ggml_type=type_name, layer=self.prefix)
        return QuantizedPart(spec, weights, rows)


class GGUFConfig(QuantConfig):
    """The tensor types of the file's linear projections, by Hugging Face name."""

    name = "gguf"

    def __init__(self, types: dict[str, str], head: tuple[GGUFFile, str, str] | None = None) -> None:
        self.types = types  # by checkpoint name: what the loader hands over as raw blocks
        self.layer_types = types  # by the model's name for each (``use_module_names``): what layers look up
        self.head = head  # (file, tensor name, block type) of the output projection, where it is block-quantized

    @classmethod
    def from_file(cls, g: GGUFFile, names: dict[str, str]) -> GGUFConfig:
        """``names``: llama.cpp tensor name -> Hugging Face name (``gguf_hf.mapped_tensor_names``)."""
        from gguf import GGMLQuantizationType

        types = {}
        for name, info in g.tensors.items():
            if name.startswith("blk.") and name.split(".")[2] in LINEAR_BLOCK_TENSORS:
                hf = names.get(name)
                if hf is not None:
                    types[hf] = GGMLQuantizationType(info.ggml_type).name
        head = None
        # llama.cpp's output projection: its own tensor, or the token embedding where the file ties them
        name = "output.weight" if "output.weight" in g.tensors else "token_embd.weight"
        if name in g.tensors:
            head_type = GGMLQuantizationType(g.tensors[name].ggml_type).name
            if head_type not in PLAIN_TYPES:
                head = (g, name, head_type)
        return cls(types, head)

    def lm_head_part(self, vocab_size: int, hidden_size: int) -> QuantizedPart | None:
        """The output projection kept in its blocks (SmolLM2's tied Q8_0 embedding: 30 MB a step instead of
        113 MB in float32), as llama.cpp runs it. Only the formats a group kernel runs (not raw ``gguf`` blocks)."""
        from llmctl.plugins.types import QuantLinearSpec

        if self.head is None:
            return None
        g, name, type_name = self.head
        raw = torch.from_numpy(np.array(g.raw(name)))
        per, size = block_bytes(type_name)
        if raw.shape != (vocab_size, hidden_size // per * size) or hidden_size % per:
            return None  # a head padded or split differently from the model's vocabulary: left dequantized
        fmt, weights, group = convert_blocks(raw, type_name, hidden_size)
        if fmt not in ("int4", "int8"):
            return None
        spec = QuantLinearSpec(format=fmt, in_features=hidden_size, out_features=vocab_size,
                               bits=4 if fmt == "int4" else 8, group_size=group, ggml_type=type_name, layer="lm_head")
        return QuantizedPart(spec, weights, None)

    def quantized_types(self) -> list[str]:
        return sorted({t for t in self.types.values() if t not in PLAIN_TYPES})

    def describe(self) -> str:
        return f"gguf ({', '.join(self.quantized_types()) or 'no quantized linear tensors'})"

    def use_module_names(self, module_name: Callable[[str], str]) -> None:
        """Layers look their tensors up by the model's names (Starcoder2's ``mlp.c_fc`` is the model's ``mlp.fc1``)."""
        self.layer_types = {module_name(name): t for name, t in self.types.items()}

    def linear_quantizer(self, prefix: str, layer: Linear, shard_names: Sequence[str]) -> LinearQuantizer | None:
        types = [self.layer_types.get(f"{n}.weight") for n in shard_names]
        fused = self.layer_types.get(f"{prefix}.weight") if len(shard_names) > 1 else None
        if fused is not None and all(t is None for t in types):
            # One tensor already stacks the merged layer's parts (Phi-3's attn_qkv, and its ffn_up holding gate and
            # up): the loader cuts it by rows, and a row of raw blocks is whole blocks, so each part is the same type.
            types = [fused] * len(shard_names)
        if any(t is None for t in types):
            return None  # not a projection the file stores per block (e.g. a model-specific layer)
        plain = [t in PLAIN_TYPES for t in types]
        if all(plain):
            return None
        if any(plain):
            raise ValueError(f"quantization gguf: layer {prefix} stacks plain and block-quantized tensors "
                             f"({', '.join(f'{n}: {t}' for n, t in zip(shard_names, types, strict=True))}); "
                             "that mix is not supported")
        return GGUFLinear(prefix, [t for t in types if t is not None])

    def input_unit(self, prefix: str, in_features: int) -> tuple[int, str] | None:
        t = self.types.get(f"{prefix}.weight")
        if t is None or t in PLAIN_TYPES:
            return None
        return block_bytes(t)[0], f"{t} block"

    def keeps_quantized(self, hf_name: str) -> bool:
        """Whether the loader should hand this tensor over as raw blocks."""
        t = self.types.get(hf_name)
        return t is not None and t not in PLAIN_TYPES
