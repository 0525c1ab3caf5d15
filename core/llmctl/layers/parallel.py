"""Tensor-parallel projections and embeddings: each rank holds a slice of the weight and reads only that slice
from the checkpoint.

The split follows the usual Megatron layout, which needs one all-reduce per attention block and one per MLP:
q/k/v and gate/up are split by output rows (each rank computes whole heads and whole intermediate columns, with
no communication), o_proj and down_proj by input columns (each rank's partial sums are added by the platform's
communicator). The vocabulary is split by rows, the embedding's lookups summed and the LM head's logits gathered.
At group size 1 every class here is exactly its base class: same parameters, same forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llmctl.layers._params import SlicedTensor, copy_checked, empty_param, read_slice
from llmctl.layers.embedding import LMHead, VocabEmbedding
from llmctl.layers.linear import Linear, MergedLinear
from llmctl.tensor_parallel import SINGLE, TensorParallelGroup, kv_head_slice, split_evenly, vocab_slice


class MergedColumnParallelLinear(MergedLinear):
    """Stacked projections (gate/up) split by output rows: each rank holds its rows of every stacked part, so
    the stacked layout (and the platform's fused SiLU-and-mul over it) is unchanged on the rank."""

    tp_split = "output"

    def __init__(self, in_features: int, output_sizes: list[int], *, bias: bool, dtype: torch.dtype,
                 device: torch.device, tp: TensorParallelGroup = SINGLE) -> None:
        self.tp = tp
        local = [split_evenly(n, tp.size, "intermediate_size") for n in output_sizes]
        super().__init__(in_features, local, bias=bias, dtype=dtype, device=device)
        self.shard_starts = [tp.rank * n for n in local]
        self.full_output_sizes = list(output_sizes)  # the checkpoint's rows (what a LoRA adapter's B spans)

    def load_shard(self, param: torch.Tensor, shard: int, tensor: Any, name: str) -> None:
        if self.quantizer is not None and param is not self.bias:  # it knows where its tensors' rows run
            super().load_shard(param, shard, tensor, name)
            return
        rows = read_slice(tensor, 0, self.shard_starts[shard], self.output_sizes[shard]) \
            if self.tp.size > 1 else tensor
        super().load_shard(param, shard, rows, name)


class QKVParallelLinear(MergedLinear):
    """q, k and v stacked and split by heads: each rank holds ``num_heads / tp`` query heads and the KV heads
    they attend with (one replicated KV head per rank when there are fewer KV heads than ranks)."""

    tp_split = "output"

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *, bias: bool,
                 dtype: torch.dtype, device: torch.device, tp: TensorParallelGroup = SINGLE) -> None:
        self.tp = tp
        self.num_local_heads = split_evenly(num_heads, tp.size, "num_attention_heads")
        kv_first, self.num_local_kv_heads = kv_head_slice(num_kv_heads, tp.size, tp.rank)
        q_size, kv_size = self.num_local_heads * head_dim, self.num_local_kv_heads * head_dim
        super().__init__(hidden_size, [q_size, kv_size, kv_size], bias=bias, dtype=dtype, device=device)
        self.shard_starts = [tp.rank * q_size, kv_first * head_dim, kv_first * head_dim]
        self.full_output_sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]

    def load_shard(self, param: torch.Tensor, shard: int, tensor: Any, name: str) -> None:
        if self.quantizer is not None and param is not self.bias:  # it knows where its tensors' rows run
            super().load_shard(param, shard, tensor, name)
            return
        rows = read_slice(tensor, 0, self.shard_starts[shard], self.output_sizes[shard]) \
            if self.tp.size > 1 else tensor
        super().load_shard(param, shard, rows, name)


class ColumnParallelLinear(Linear):
    """One projection split by output rows (a plain MLP's fc1): each rank computes its columns of the output, and
    the row-parallel layer after it takes them as its input slice. Its bias is split with the rows."""

    tp_split = "output"

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype,
                 device: torch.device, tp: TensorParallelGroup = SINGLE, what: str = "out_features") -> None:
        self.tp = tp
        local = split_evenly(out_features, tp.size, what)
        super().__init__(in_features, local, bias=bias, dtype=dtype, device=device)
        self.shard_starts = [tp.rank * local]
        self.full_output_sizes = [out_features]  # the checkpoint's rows (what a LoRA adapter's B spans)

    def load_param(self, param: torch.Tensor, tensor: Any, name: str) -> None:
        if self.quantizer is not None and param is not self.bias:  # packed rows: the quantizer reads its part
            pname = next(n for n, p in self._parameters.items() if p is param)
            self.quantizer.load_param(self, pname, tensor, name)
            return
        if self.tp.size > 1:
            tensor = read_slice(tensor, 0, self.shard_starts[0], self.out_features)
        copy_checked(param.data, tensor, name)


def load_stacked_tensor(layer: MergedLinear, param: torch.Tensor, tensor: Any, name: str) -> None:
    """A checkpoint tensor that already stacks a merged layer's parts (Phi-3's qkv_proj and gate_up_proj, GPT-2's
    c_attn): split at the checkpoint's part sizes, and under tensor parallelism only this rank's rows of each
    part are read. A quantized layer's tensors are cut where their outputs run (``QParam.out_dim``, in packed
    words), and each projection's part goes to the quantizer, which reads the rank's rows of it."""
    quantizer = layer.quantizer
    if quantizer is not None and param is not layer.bias:
        _load_stacked_quantized(layer, param, tensor, name)
        return
    tp = getattr(layer, "tp", SINGLE)
    if tp.size == 1:
        for shard, part in enumerate(tensor.split(layer.output_sizes, dim=0)):
            layer.load_shard(param, shard, part, name)
        return
    full = layer.full_output_sizes
    if tensor.shape[0] != sum(full):
        raise ValueError(f"weight {name}: checkpoint shape {tuple(tensor.shape)} does not stack parts of {full} rows")
    offset = 0
    for shard, rows in enumerate(full):
        part = read_slice(tensor, 0, offset + layer.shard_starts[shard], layer.output_sizes[shard])
        MergedLinear.load_shard(layer, param, shard, part, name)  # already this rank's rows
        offset += rows


def _load_stacked_quantized(layer: MergedLinear, param: torch.Tensor, tensor: Any, name: str) -> None:
    quantizer = layer.quantizer
    assert quantizer is not None
    pname = next(n for n, p in layer._parameters.items() if p is param)
    p = quantizer._params.get(pname)
    if p is None:
        raise ValueError(f"quantization {quantizer.method}: tensor {name} is not part of this method's layout")
    full = getattr(layer, "full_output_sizes", None) or layer.output_sizes
    if p.out_dim is None:  # stored once for the fused projection (a per-tensor scale, CT's weight_shape)
        for shard, part in enumerate(quantizer.fused_parts(pname, tensor, full)):
            layer.load_shard(param, shard, part, name)
        return
    if tensor.shape[p.out_dim] * p.out_pack != sum(full) or any(rows % p.out_pack for rows in full):
        raise ValueError(f"quantization {quantizer.method}: tensor {name} has shape {tuple(tensor.shape)}, which "
                         f"does not stack parts of {full} outputs along dim {p.out_dim} ({p.out_pack} per entry)")
    offset = 0
    for shard, rows in enumerate(full):
        layer.load_shard(param, shard, SlicedTensor(tensor, p.out_dim, offset // p.out_pack, rows // p.out_pack), name)
        offset += rows


class RowParallelLinear(Linear):
    """Split by input columns: the rank's input is already its slice (the heads or intermediate columns it
    computed), its output a partial sum that the communicator adds up. The bias is added once, after the sum."""

    tp_split = "input"

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype,
                 device: torch.device, tp: TensorParallelGroup = SINGLE, what: str = "in_features") -> None:
        self.tp = tp
        super().__init__(split_evenly(in_features, tp.size, what), out_features, bias=bias, dtype=dtype,
                         device=device)

    def load_param(self, param: torch.Tensor, tensor: Any, name: str) -> None:
        if self.quantizer is not None and param is not self.bias:  # its columns, in whole groups and words
            pname = next(n for n, p in self._parameters.items() if p is param)
            self.quantizer.load_param(self, pname, tensor, name)
            return
        if self.tp.size > 1 and param is not self.bias:  # the weight (a quantized layer has none: its bias is whole)
            tensor = read_slice(tensor, 1, self.tp.rank * self.in_features, self.in_features)
        copy_checked(param.data, tensor, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        y = self._linear(x, self.weight if self._packed is None else self._packed, None)
        if self.lora is not None:  # this rank's columns of A: a partial delta, summed with the partial y
            y = self.lora.add(x, y)
        y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias


def _load_vocab_rows(layer: VocabParallelEmbedding | ParallelLMHead, param: torch.Tensor, tensor: Any,
                     name: str) -> None:
    tp = layer.tp
    if tp.size == 1:
        copy_checked(param.data, tensor, name)
        return
    full = (layer.vocab_size, param.shape[1])
    if tuple(tensor.shape) != full:
        raise ValueError(f"weight {name}: checkpoint shape {tuple(tensor.shape)} does not match {full}")
    valid = layer.vocab_valid
    if valid:
        param.data[:valid].copy_(read_slice(tensor, 0, layer.vocab_start, valid))
    param.data[valid:].zero_()  # padding rows: they embed nothing and their logits are cut after the gather


class VocabParallelEmbedding(VocabEmbedding):
    """Rows split over ranks; a rank looks up the ids in its range, writes zeros for the others, and the
    all-reduce sums the one rank's row with zeros (exact in any dtype)."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype, device: torch.device,
                 tp: TensorParallelGroup = SINGLE) -> None:
        super().__init__(vocab_size, hidden_size, dtype=dtype, device=device)
        self.tp = tp
        self.vocab_start, per_rank, self.vocab_valid = vocab_slice(vocab_size, tp.size, tp.rank)
        if tp.size > 1:
            self.weight = empty_param(per_rank, hidden_size, dtype=dtype, device=device)

    def load_param(self, param: torch.Tensor, tensor: Any, name: str) -> None:
        _load_vocab_rows(self, param, tensor, name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_valid)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y = self.tp.all_reduce(y.masked_fill(outside.unsqueeze(-1), 0))
        return y if self.lora is None else self.lora.add(input_ids, y)  # full-vocabulary adapters, every rank


class ParallelLMHead(LMHead):
    """Each rank computes the logits of its vocabulary rows; they are gathered so every rank holds the full
    logits (and samples the same token as the others, which keeps their schedulers in step)."""

    def __init__(self, vocab_size: int, hidden_size: int, *, tied_to: VocabParallelEmbedding | None = None,
                 dtype: torch.dtype, device: torch.device, tp: TensorParallelGroup = SINGLE) -> None:
        super().__init__(vocab_size, hidden_size, tied_to=tied_to, dtype=dtype, device=device)
        self.tp = tp
        self.vocab_size = vocab_size
        self.vocab_start, per_rank, self.vocab_valid = vocab_slice(vocab_size, tp.size, tp.rank)
        if tp.size > 1 and tied_to is None:
            self.weight = empty_param(per_rank, hidden_size, dtype=dtype, device=device)

    def load_param(self, param: torch.Tensor, tensor: Any, name: str) -> None:
        _load_vocab_rows(self, param, tensor, name)

    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().base_logits(hidden)
        if self.tp.size == 1:
            return logits
        gathered = self.tp.all_gather(logits, dim=-1)
        return gathered if gathered.shape[-1] == self.vocab_size else gathered[..., : self.vocab_size].contiguous()
