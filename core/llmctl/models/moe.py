"""A sparse mixture-of-experts block: a router, the experts' stacked weights, an optional shared expert.

The experts run through the ``fused_moe`` op (core's torch reference, or a platform's kernel), which takes the
experts' gate/up weights stacked as ``[E, 2 * I, H]`` and their down weights as ``[E, H, I]``: one tensor per
layer, the shape expert-parallel sharding cuts along ``E``. Routing stays here, in torch, because it differs
per family (softmax then top-k, renormalised or not).

Under tensor parallelism every expert is split like a dense MLP: each rank holds its slice of every expert's
intermediate columns (``moe_intermediate_size / tp``), routes every token itself (the router is replicated), and
the ranks' partial outputs are summed by one all-reduce. With ``enable_expert_parallel`` a rank holds whole
experts instead, ``num_experts / tp`` of them, or ``num_experts / (dp * tp)`` when the data-parallel replicas
share their experts (``llmctl.expert_parallel``: placement, dispatch and combine). A
shared expert (Qwen2-MoE, DeepSeek) is split by its columns either way, like a dense MLP: every token goes
through it, so placing it on one rank would make that rank do every token's work.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from llmctl.expert_parallel import (
    ExpertPlacement,
    dispatch_combine,
    dispatch_combine_across,
    expert_placement,
    local_all_reduce,
    use_dispatch,
)
from llmctl.layers._module import EngineModule
from llmctl.layers._params import copy_checked, empty_param, materialize, read_slice
from llmctl.layers.linear import Linear
from llmctl.layers.mlp import GatedMLP
from llmctl.models.base import ModelContext
from llmctl.ops import Ops
from llmctl.quantization.moe import BoundParts, MoEQuantMethod, bind_experts
from llmctl.tensor_parallel import split_evenly

if TYPE_CHECKING:
    from llmctl.models.decoder import MoESpec
    from llmctl.quantization.base import QuantConfig, QuantizedPart

_EXPERT = re.compile(r"^(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class SparseMoE(EngineModule):
    def __init__(self, hidden_size: int, spec: MoESpec, act: str, ctx: ModelContext) -> None:
        super().__init__()
        kw = dict(dtype=ctx.dtype, device=ctx.device)
        self.ops = ctx.ops
        self.spec = spec
        self.act = act
        self.tp = ctx.tp
        # experts placed whole per rank (expert parallelism, over every replica's ranks when the data-parallel
        # replicas share them), or every expert split by its columns
        self.ep = ctx.ep if ctx.expert_parallel and ctx.ep is not None and ctx.ep.size > 1 else None
        if self.ep is not None:
            self.placement: ExpertPlacement | None = expert_placement(
                spec.num_experts, self.ep.size, self.ep.rank, self.ep.size // ctx.tp.size)
        else:
            self.placement = expert_placement(spec.num_experts, ctx.tp.size, ctx.tp.rank) \
                if ctx.expert_parallel and ctx.tp.size > 1 else None
        self._dispatch = self.placement is not None and use_dispatch(ctx.tp)
        if self.placement is not None:
            local, i = self.placement.count, spec.intermediate_size
        else:
            local, i = spec.num_experts, split_evenly(spec.intermediate_size, ctx.tp.size, "moe_intermediate_size")
        e = spec.num_experts
        self.local_intermediate = i
        self.hidden_size, self.dtype, self.device = hidden_size, ctx.dtype, ctx.device
        self.gate = Linear(hidden_size, e, bias=False, **kw)
        self.gate.quantizable = False  # the router stays in the model dtype under any quantization, as in vLLM
        self.w13 = empty_param(local, 2 * i, hidden_size, **kw)
        self.w2 = empty_param(local, hidden_size, i, **kw)
        self.shared_expert = (GatedMLP(hidden_size, spec.shared_intermediate_size, act, ctx.ops, tp=ctx.tp, **kw)
                              if spec.shared_intermediate_size else None)
        self.shared_expert_gate = Linear(hidden_size, 1, bias=False, **kw) if spec.shared_expert_gate else None
        if self.shared_expert_gate is not None:
            self.shared_expert_gate.quantizable = False
        self.e_score_correction_bias = (empty_param(e, dtype=torch.float32, device=ctx.device)
                                        if spec.topk_method == "noaux_tc" else None)
        self._loaded: set[str] = set()
        self._packed: tuple[Any, Any] | None = None
        self.quant_method: MoEQuantMethod | None = None

    def local_experts(self) -> range:
        """The experts this rank holds (whole or its columns of each)."""
        if self.placement is None:
            return range(self.spec.num_experts)
        return range(self.placement.first, self.placement.first + self.placement.count)

    def quantize_experts(self, config: QuantConfig, prefix: str) -> None:
        """Before loading: the config's MoE method takes the routed experts (none: they stay dense). A method
        that reads the checkpoint's quantized tensors replaces the dense stacks, which are then never filled."""
        method = config.moe_method(prefix, self)
        if method is None:
            return
        method.create_weights(self)
        self.quant_method = method
        if method.reads_checkpoint:
            self.w13.data = self.w13.data.new_empty(0)
            self.w2.data = self.w2.data.new_empty(0)

    def finish_expert_quantization(self, bind: Callable[[list[QuantizedPart]], BoundParts]) -> None:
        """After loading: the method's per-expert parts, each bound to its kernel by ``bind``; dense stacks
        that were quantized from are released."""
        assert self.quant_method is not None
        bind_experts(self.quant_method, self.quant_method.finish(self), bind)
        self.w13.data = self.w13.data.new_empty(0)
        self.w2.data = self.w2.data.new_empty(0)

    def bind_ops(self, ops: Ops) -> None:
        """After loading: where the platform repacks the experts for its ``fused_moe`` (once), the layer runs on
        its copy and releases the plain stacks so the experts are not held twice."""
        if self.quant_method is not None:
            return
        packed = ops.pack_fused_moe_weights(self.w13.detach(), self.w2.detach(), self.act)
        if packed is None:
            return
        self._packed = packed
        self.w13.data = self.w13.data.new_empty(0)
        self.w2.data = self.w2.data.new_empty(0)

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k weights [T, k] in the hidden dtype, expert ids [T, k]) as the reference implementations do:
        softmax in float32 over all experts, top-k, optionally renormalised over the chosen k."""
        spec = self.spec
        logits = self.gate(hidden).float()
        if spec.topk_method == "greedy" and spec.scoring == "softmax":
            probs = torch.softmax(logits, dim=-1)
            weights, ids = torch.topk(probs, spec.top_k, dim=-1)
        else:
            weights, ids = self._grouped_topk(logits)
        if spec.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if spec.scoring == "sigmoid" else 0.0))
        if spec.routed_scaling_factor != 1.0:
            weights = weights * spec.routed_scaling_factor
        return weights.to(hidden.dtype), ids

    def _grouped_topk(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek's routing: experts split into groups, only the best ``topk_groups`` groups compete (V2 ranks a
        group by its best expert, V3 by its two best bias-corrected scores)."""
        spec, t = self.spec, logits.shape[0]
        scores = logits.softmax(dim=-1) if spec.scoring == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if spec.topk_method == "greedy":
            return torch.topk(scores, spec.top_k, dim=-1)
        grouped = choice.view(t, spec.num_groups, -1)
        group_scores = grouped.max(dim=-1).values if spec.topk_method == "group_limited_greedy" \
            else grouped.topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, spec.topk_groups, dim=-1)[1]
        keep = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape(t, -1)
        if spec.topk_method == "group_limited_greedy":
            return torch.topk(scores.masked_fill(~keep, 0.0), spec.top_k, dim=-1)
        ids = torch.topk(choice.masked_fill(~keep, float("-inf")), spec.top_k, dim=-1)[1]
        return scores.gather(1, ids), ids

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(hidden)
        if self.placement is None:
            out = self.tp.all_reduce(self.run_experts(hidden, weights, ids))
        elif self.ep is not None:
            out = dispatch_combine_across(hidden, weights, ids, self.placement, self.ep, self.tp, self.run_experts)
        else:
            out = (dispatch_combine if self._dispatch else local_all_reduce)(
                hidden, weights, ids, self.placement, self.tp, self.run_experts)
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(hidden)) * shared
            out = out + shared
        return out

    def run_experts(self, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This rank's experts on ``hidden`` (``ids`` local): the quantized method's, or ``fused_moe``."""
        if self.quant_method is not None:
            return self.quant_method.apply(hidden, weights, ids)
        w13, w2 = (self.w13, self.w2) if self._packed is None else self._packed
        return self.ops.fused_moe(hidden, w13, w2, weights, ids, self.act)

    def forward_idle(self) -> None:
        """This replica has no tokens this step: take part in the exchange across replicas with none, running
        this rank's experts on what the other replicas send (``llmctl.expert_parallel.idle_moe_step``)."""
        if self.ep is None or self.placement is None:
            return
        hidden, dtype, device, k = self.hidden_size, self.dtype, self.device, self.spec.top_k
        dispatch_combine_across(torch.zeros(0, hidden, dtype=dtype, device=device),
                                torch.zeros(0, k, dtype=dtype, device=device),
                                torch.zeros(0, k, dtype=torch.long, device=device), self.placement, self.ep, self.tp,
                                self.run_experts)

    # -- loading: per-expert checkpoint tensors into the stacked parameters ------------------------------------
    @torch.no_grad()
    def load_expert_tensor(self, rest: str, tensor: torch.Tensor, name: str) -> None:
        """``rest`` is the name after ``.experts.``: ``{e}.gate_proj.weight`` (and up/down) per expert, or
        ``stacked_w13.weight`` / ``stacked_w2.weight`` for checkpoints that already stack them (Granite-MoE).
        Under tensor parallelism only this rank's intermediate columns are read (DBRX's are read whole first);
        under expert parallelism only this rank's experts, whole (another rank's per-expert tensors are skipped
        unread). Experts kept quantized from the checkpoint go to the quantization's MoE method instead."""
        if self.quant_method is not None and self.quant_method.reads_checkpoint:
            self.quant_method.load(self, rest, tensor, name)
            return
        if self.placement is not None:
            self._load_own_experts(rest, tensor, name)
            return
        full, i = self.spec.intermediate_size, self.local_intermediate
        first = self.tp.rank * i  # this rank's first intermediate column
        if rest == "stacked_w13.weight":
            if self.tp.size > 1:  # [E, 2 * I, H]: this rank's rows of the gate half, then of the up half
                tensor = torch.cat([read_slice(tensor, 1, first, i), read_slice(tensor, 1, full + first, i)], dim=1)
            copy_checked(self.w13.data, tensor, name)
            self._loaded |= {f"{e}.{p}" for e in range(self.spec.num_experts) for p in ("gate", "up")}
            return
        if rest == "stacked_w2.weight":
            copy_checked(self.w2.data, read_slice(tensor, 2, first, i) if self.tp.size > 1 else tensor, name)
            self._loaded |= {f"{e}.down" for e in range(self.spec.num_experts)}
            return
        if rest in ("dbrx_w1", "dbrx_v1", "dbrx_w2"):  # DBRX: each [E * I, H]; w2 holds the down weights transposed
            e_, h = self.spec.num_experts, self.w13.shape[-1]
            stacked = materialize(tensor).reshape(e_, full, h).narrow(1, first, i)
            self._load_dbrx(rest, stacked, name, range(e_))
            return
        e, proj = self._expert_of(rest, name)
        if proj == "down_proj":
            copy_checked(self.w2.data[e], read_slice(tensor, 1, first, i) if self.tp.size > 1 else tensor, name)
        else:
            rows = read_slice(tensor, 0, first, i) if self.tp.size > 1 else tensor
            copy_checked(self.w13.data[e].narrow(0, 0 if proj == "gate_proj" else i, i), rows, name)
        self._loaded.add(f"{e}.{proj.removesuffix('_proj')}")

    def _load_own_experts(self, rest: str, tensor: torch.Tensor, name: str) -> None:
        """Expert parallelism: this rank's experts whole, at local index ``e - first``."""
        assert self.placement is not None
        first, count, i = self.placement.first, self.placement.count, self.local_intermediate
        own = range(first, first + count)
        if rest in ("stacked_w13.weight", "stacked_w2.weight"):  # [E, ...]: this rank's experts only
            param = self.w13 if rest == "stacked_w13.weight" else self.w2
            copy_checked(param.data, read_slice(tensor, 0, first, count), name)
            parts = ("gate", "up") if rest == "stacked_w13.weight" else ("down",)
            self._loaded |= {f"{e}.{p}" for e in own for p in parts}
            return
        if rest in ("dbrx_w1", "dbrx_v1", "dbrx_w2"):
            h = self.w13.shape[-1]
            stacked = materialize(tensor).reshape(self.spec.num_experts, i, h).narrow(0, first, count)
            self._load_dbrx(rest, stacked, name, own)
            return
        e, proj = self._expert_of(rest, name)
        if not self.placement.owns(e):
            return  # another rank's expert: never read
        local = e - first
        if proj == "down_proj":
            copy_checked(self.w2.data[local], tensor, name)
        else:
            copy_checked(self.w13.data[local].narrow(0, 0 if proj == "gate_proj" else i, i), tensor, name)
        self._loaded.add(f"{e}.{proj.removesuffix('_proj')}")

    def _load_dbrx(self, rest: str, stacked: torch.Tensor, name: str, experts: range) -> None:
        """``stacked`` [local experts, I, H] (this rank's experts, or its columns of every expert)."""
        i = self.local_intermediate
        if rest == "dbrx_w2":
            copy_checked(self.w2.data, stacked.transpose(1, 2), name)
            self._loaded |= {f"{e}.down" for e in experts}
        else:
            copy_checked(self.w13.data.narrow(1, 0 if rest == "dbrx_w1" else i, i), stacked, name)
            self._loaded |= {f"{e}.{'gate' if rest == 'dbrx_w1' else 'up'}" for e in experts}

    def _expert_of(self, rest: str, name: str) -> tuple[int, str]:
        m = _EXPERT.match(rest)
        if m is None or int(m.group(1)) >= self.spec.num_experts:
            raise ValueError(f"checkpoint tensor {name} has no place in the mixture-of-experts layer")
        return int(m.group(1)), m.group(2)

    def missing_expert_tensors(self, param_name: str) -> list[str]:
        if param_name.endswith(".gate.weight") or ".shared_expert" in param_name:
            return []
        if self.quant_method is not None and self.quant_method.reads_checkpoint:
            return self.quant_method.missing(self, down=param_name.endswith(".w2"))
        parts = ("down",) if param_name.endswith(".w2") else ("gate", "up")
        prefix = param_name.rsplit(".", 1)[0]
        experts = range(self.spec.num_experts) if self.placement is None else \
            range(self.placement.first, self.placement.first + self.placement.count)
        return [f"{prefix}.experts.{e}.{p}_proj" for e in experts for p in parts if f"{e}.{p}" not in self._loaded]
