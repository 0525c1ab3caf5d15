"""A sparse mixture-of-experts block: a router, the experts' stacked weights, an optional shared expert.

The experts run through the ``fused_moe`` op (core's torch reference, or a platform's kernel), which takes the
experts' gate/up weights stacked as ``[E, 2 * I, H]`` and their down weights as ``[E, H, I]``: one tensor per
layer, the shape expert-parallel sharding cuts along ``E``. Routing stays here, in torch, because it differs
per family (softmax then top-k, renormalised or not).

Under tensor parallelism every expert is split like a dense MLP: each rank holds its slice of every expert's
intermediate columns (``moe_intermediate_size / tp``), routes every token itself (the router is replicated), and
the ranks' partial outputs are summed by one all-reduce. No expert-parallel (experts placed on different ranks)
mode exists yet.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from llmctl.layers._module import EngineModule
from llmctl.layers._params import copy_checked, empty_param, materialize, read_slice
from llmctl.layers.linear import Linear
from llmctl.layers.mlp import GatedMLP
from llmctl.models.base import ModelContext
from llmctl.ops import Ops
from llmctl.tensor_parallel import split_evenly

if TYPE_CHECKING:
    from llmctl.models.decoder import MoESpec

_EXPERT = re.compile(r"^(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class SparseMoE(EngineModule):
    def __init__(self, hidden_size: int, spec: MoESpec, act: str, ctx: ModelContext) -> None:
        super().__init__()
        kw = dict(dtype=ctx.dtype, device=ctx.device)
        self.ops = ctx.ops
        self.spec = spec
        self.act = act
        self.tp = ctx.tp
        e, i = spec.num_experts, split_evenly(spec.intermediate_size, ctx.tp.size, "moe_intermediate_size")
        self.local_intermediate = i
        self.gate = Linear(hidden_size, e, bias=False, **kw)
        self.w13 = empty_param(e, 2 * i, hidden_size, **kw)
        self.w2 = empty_param(e, hidden_size, i, **kw)
        self.shared_expert = (GatedMLP(hidden_size, spec.shared_intermediate_size, act, ctx.ops, tp=ctx.tp, **kw)
                              if spec.shared_intermediate_size else None)
        self.shared_expert_gate = Linear(hidden_size, 1, bias=False, **kw) if spec.shared_expert_gate else None
        self.e_score_correction_bias = (empty_param(e, dtype=torch.float32, device=ctx.device)
                                        if spec.topk_method == "noaux_tc" else None)
        self._loaded: set[str] = set()
        self._packed: tuple[Any, Any] | None = None

    def bind_ops(self, ops: Ops) -> None:
        """After loading: where the platform repacks the experts for its ``fused_moe`` (once), the layer runs on
        its copy and releases the plain stacks so the experts are not held twice."""
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
        w13, w2 = (self.w13, self.w2) if self._packed is None else self._packed
        out = self.tp.all_reduce(self.ops.fused_moe(hidden, w13, w2, weights, ids, self.act))
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(hidden)) * shared
            out = out + shared
        return out

    # -- loading: per-expert checkpoint tensors into the stacked parameters ------------------------------------
    @torch.no_grad()
    def load_expert_tensor(self, rest: str, tensor: torch.Tensor, name: str) -> None:
        """``rest`` is the name after ``.experts.``: ``{e}.gate_proj.weight`` (and up/down) per expert, or
        ``stacked_w13.weight`` / ``stacked_w2.weight`` for checkpoints that already stack them (Granite-MoE).
        Under tensor parallelism only this rank's intermediate columns are read (DBRX's are read whole first)."""
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
            if rest == "dbrx_w2":
                copy_checked(self.w2.data, stacked.transpose(1, 2), name)
                self._loaded |= {f"{e}.down" for e in range(e_)}
            else:
                copy_checked(self.w13.data.narrow(1, 0 if rest == "dbrx_w1" else i, i), stacked, name)
                self._loaded |= {f"{e}.{'gate' if rest == 'dbrx_w1' else 'up'}" for e in range(e_)}
            return
        m = _EXPERT.match(rest)
        if m is None or int(m.group(1)) >= self.spec.num_experts:
            raise ValueError(f"checkpoint tensor {name} has no place in the mixture-of-experts layer")
        e, proj = int(m.group(1)), m.group(2)
        if proj == "down_proj":
            copy_checked(self.w2.data[e], read_slice(tensor, 1, first, i) if self.tp.size > 1 else tensor, name)
        else:
            rows = read_slice(tensor, 0, first, i) if self.tp.size > 1 else tensor
            copy_checked(self.w13.data[e].narrow(0, 0 if proj == "gate_proj" else i, i), rows, name)
        self._loaded.add(f"{e}.{proj.removesuffix('_proj')}")

    def missing_expert_tensors(self, param_name: str) -> list[str]:
        if param_name.endswith(".gate.weight") or ".shared_expert" in param_name:
            return []
        parts = ("down",) if param_name.endswith(".w2") else ("gate", "up")
        prefix = param_name.rsplit(".", 1)[0]
        return [f"{prefix}.experts.{e}.{p}_proj" for e in range(self.spec.num_experts) for p in parts
                if f"{e}.{p}" not in self._loaded]
