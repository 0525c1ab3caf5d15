"""Quantized layers under tensor parallelism: which part of each checkpoint tensor a rank reads, and the checks
that refuse a split that would cut a quantization group or a packed word.

A column-parallel layer (q/k/v, gate/up) holds whole output rows, so its packed weights and their scales and zeros
are cut along the output dim (``QParam.out_dim``, in whole packed words). A row-parallel layer (o_proj, down_proj)
holds a contiguous run of input columns, so every tensor that runs along the inputs (``QParam.in_dim``) is cut
at the rank's first column, in whole units (``QParam.in_unit``): a scale per group, an int32 per 8 values, a
GGUF block per 32 or 256 values. A rank's input run that does not start and end on such a boundary cannot be
held without re-quantizing, so it is refused at start-up, naming the layer, the unit and the size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from llmctl.layers._params import materialize, read_slice

if TYPE_CHECKING:
    from llmctl.layers.linear import Linear
    from llmctl.quantization.base import QParam, QuantConfig


def rank_split(layer: Linear) -> tuple[int, int, str] | None:
    """(rank, size, "input" or "output") for a layer split over more than one rank, else None."""
    tp = getattr(layer, "tp", None)
    split = getattr(layer, "tp_split", None)
    if tp is None or tp.size == 1 or split is None:
        return None
    return tp.rank, tp.size, split


def input_unit_refusal(method: str, prefix: str, layer: Linear, unit: int, what: str) -> str:
    """The message for a layer whose (per-rank) input width is not a multiple of ``unit``."""
    k = layer.in_features
    split = rank_split(layer)
    if split is not None and split[2] == "input":
        return row_split_refusal(method, prefix, k * split[1], split[1], unit, what)
    return f"quantization {method}: layer {prefix}: in_features {k} is not a multiple of {what}={unit}"


def row_split_refusal(method: str, prefix: str, in_features: int, size: int, unit: int, what: str) -> str:
    hint = " or set quantization to none to load the file dequantized" if method == "gguf" else ""
    return (f"tensor_parallel_size: {size} splits layer {prefix} by its {in_features} input columns, "
            f"{in_features // size} per rank, which is not a multiple of the {method} {what}={unit} (a rank must "
            f"hold whole ones); use a tensor_parallel_size that keeps them whole{hint}")


def _projections(layer: Linear) -> tuple[list[int], list[int]]:
    """(this rank's rows, the checkpoint's rows) of each projection a layer stacks; an unmerged column-parallel
    layer (a plain MLP's fc1) is one projection."""
    sizes = getattr(layer, "output_sizes", None) or [layer.out_features]
    return list(sizes), list(getattr(layer, "full_output_sizes", None) or sizes)


def check_output_split(method: str, prefix: str, layer: Linear, p: QParam, name: str) -> None:
    """A column-parallel rank's rows of each projection must start and end on a packed word."""
    split = rank_split(layer)
    if split is None or split[2] != "output" or p.out_dim is None or p.out_pack == 1:
        return
    for start, size in zip(layer.shard_starts, _projections(layer)[0], strict=True):  # type: ignore[attr-defined]
        if start % p.out_pack or size % p.out_pack:
            raise ValueError(f"tensor_parallel_size: {split[1]} gives layer {prefix} {size} output rows per "
                             f"projection and rank, which is not a multiple of the {p.out_pack} values one "
                             f"{method} {name} word packs; use a tensor_parallel_size that keeps them whole")


def checkpoint_shape(layer: Linear, p: QParam, shard: int | None) -> tuple[int, ...]:
    """The shape of the checkpoint tensor behind ``p`` (of projection ``shard`` of a merged layer): the whole
    projection, not this rank's part of it."""
    shape = list(p.shape)
    split = rank_split(layer)
    if p.out_dim is not None and (shard is not None or (split is not None and split[2] == "output")):
        shape[p.out_dim] = _projections(layer)[1][shard or 0] // p.out_pack
    if split is not None and split[2] == "input" and p.in_dim is not None:
        inputs, elems = p.in_unit
        shape[p.in_dim] = layer.in_features * split[1] // inputs * elems
    return tuple(shape)


def rank_slice(layer: Linear, p: QParam, shard: int | None) -> tuple[int, int, int] | None:
    """(dim, start, length) of this rank's part of the checkpoint tensor behind ``p``, or None for all of it."""
    split = rank_split(layer)
    if split is None:
        return None
    rank, _, how = split
    if how == "output" and p.out_dim is not None:  # an unmerged column-parallel layer: its one projection
        start, size = layer.shard_starts[shard or 0], _projections(layer)[0][shard or 0]  # type: ignore[attr-defined]
        return p.out_dim, start // p.out_pack, size // p.out_pack
    if how == "input" and p.in_dim is not None:
        inputs, elems = p.in_unit
        per_rank = layer.in_features // inputs * elems
        return p.in_dim, rank * per_rank, per_rank
    return None


def read_rank_part(src: Any, part: tuple[int, int, int] | None) -> torch.Tensor:
    """The rank's part of a checkpoint tensor; a lazy one (safetensors, a GGUF map) reads only that part."""
    return materialize(src) if part is None else read_slice(src, *part)


def check_row_splits(config: QuantConfig, hf_config: Any, size: int,
                     layers: Iterable[tuple[str, int]] | None = None) -> None:
    """Before any rank starts: refuse a size that would cut a quantized row-parallel layer's groups, blocks or
    packed words (the layers check themselves again when they are built; this names the problem before ranks are
    spawned and wait for each other). ``layers``: (module prefix, in_features) of the model's row-parallel
    projections; the Llama family's by default."""
    for prefix, in_features in (_row_parallel_layers(hf_config) if layers is None else layers):
        unit = config.input_unit(prefix, in_features)
        if unit is None:
            continue
        n, what = unit
        if in_features % size == 0 and (in_features // size) % n:
            raise ValueError(row_split_refusal(config.name, prefix, in_features, size, n, what))


def _row_parallel_layers(hf_config: Any) -> Iterator[tuple[str, int]]:
    """(checkpoint prefix, in_features) of the Llama family's row-parallel projections."""
    cfg = getattr(hf_config, "text_config", None) or hf_config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    for i in range(cfg.num_hidden_layers):
        yield f"model.layers.{i}.self_attn.o_proj", heads * head_dim
        yield f"model.layers.{i}.mlp.down_proj", cfg.intermediate_size
