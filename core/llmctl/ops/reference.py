"""Plain-torch reference implementations of every op a plugin may override.

They are slow on purpose-built hardware and correct everywhere; tests use them as the oracle. An override
registered by a plugin must keep the exact signature and semantics of the function it replaces.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` computed in float32, returned in ``x``'s dtype (as Hugging Face Llama does)."""
    orig = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(orig)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = x + residual``; returns ``(rms_norm(residual), residual)``. Fusing saves a memory pass."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``query`` [T, Hq, D] and ``key`` [T, Hk, D] by position.

    ``cos_sin_cache`` is [max_position, rotary_dim]: cos in the first half of the last dim, sin in the second.
    Only the first ``rotary_dim`` features of each head rotate (partial rotary leaves the rest as is).
    Neox style rotates the two halves of the rotary features; GPT-J style rotates interleaved pairs.
    """
    cos_sin = cos_sin_cache.index_select(0, positions.long())
    rot = cos_sin.shape[-1]
    cos, sin = cos_sin.chunk(2, dim=-1)
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)

    def rotate(t: torch.Tensor) -> torch.Tensor:
        t_rot, t_pass = t[..., :rot], t[..., rot:]
        tf = t_rot.float()
        if is_neox_style:
            x1, x2 = tf.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = tf[..., 0::2], tf[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return torch.cat((out.to(t.dtype), t_pass), dim=-1)

    return rotate(query), rotate(key)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for the fused gate/up projection output of width ``2d``."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask (to -inf) logits outside each row's top-k and top-p nucleus. ``top_k`` [B] int (<= 0 or >= vocab means
    off), ``top_p`` [B] float (1.0 means off). Ties at the k-th value are kept, like a threshold would."""
    if top_k is None and top_p is None:
        return logits
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        k = top_k.to(torch.long).clamp(min=0)
        k = torch.where((k <= 0) | (k >= vocab), torch.full_like(k, vocab), k)
        kth = sorted_logits.gather(-1, (vocab - k).unsqueeze(-1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        remove = cum <= (1.0 - top_p.to(probs.dtype)).unsqueeze(-1)
        remove[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below ``min_p`` [B] times the row's top probability."""
    probs = logits.softmax(dim=-1)
    top = probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < min_p.unsqueeze(-1) * top, float("-inf"))


def greedy_sample(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (int64 [rows]): the first index on ties, a NaN's index where a row has one (as
    ``torch.argmax``). ``logits`` come in the model's dtype; comparing after an exact cast to float32 gives the
    same answer, and torch's float32 argmax is the fast one on every platform."""
    return logits.float().argmax(dim=-1)


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row, drawn with probability proportional to ``weights`` [rows, n] (non-negative, need not sum
    to 1) by ``uniforms`` [rows] in [0, 1): the first index whose running sum exceeds u times the row's total. A
    token of weight 0 is never chosen: its running sum equals its predecessor's. A row whose weights are all 0
    gets the last index (callers replace it)."""
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = uniforms.to(weights.device).unsqueeze(1) * total
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=weights.shape[1] - 1)
    # u * total can round up to the total itself; then searchsorted runs off the end: take the last token with
    # weight instead.
    off_end = (weights.gather(1, idx.unsqueeze(1)).squeeze(1) == 0) & (total.squeeze(1) > 0)
    for r in off_end.nonzero().flatten().tolist():
        idx[r] = int(weights[r].nonzero().max())
    return idx


def sample_softmax(logits: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Each row's token drawn from softmax(logits / temperature) [rows, vocab] (float32) by ``inverse_cdf`` with
    its uniform: the sampler's draw for rows without top-k, top-p or min-p."""
    probs = (logits / temperatures.to(logits.device).unsqueeze(1)).softmax(dim=-1, dtype=torch.float32)
    return inverse_cdf(probs, uniforms)


def sampled_logprobs(x: torch.Tensor, chosen: torch.Tensor, k: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For float32 logits ``x`` [rows, vocab] and the sampled ids ``chosen`` [rows]: (the sampled tokens'
    log-probabilities [rows], their ranks [rows] (1 + the count of larger logits), the top ``k`` log-probabilities
    [rows, k] descending and their ids [rows, k]). Only a few values per row are wanted: those are shifted by the
    row's log-normaliser instead of writing the whole log_softmax; ranks compare the raw logits, which order the
    tokens exactly as their log-probabilities do."""
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    sampled_raw = x.gather(1, chosen.unsqueeze(1))
    ranks = (x > sampled_raw).sum(dim=1) + 1
    top_vals, top_ids = x.topk(k, dim=-1) if k > 0 else (x[:, :0], x[:, :0].long())
    return (sampled_raw - lse).squeeze(1), ranks, top_vals - lse, top_ids


# What a platform's ``pack_linear_weight`` / ``pack_gated_linear_weight`` returns: a tensor or the platform's own
# typed wrapper (format and logical shape beside a padded buffer). Opaque to core, which only hands it back.
PackedLinearWeight = Any


def pack_linear_weight(weight: torch.Tensor) -> PackedLinearWeight:
    """Turn a loaded ``[out, in]`` weight into whatever the platform's ``linear`` runs fastest on (a blocked
    layout, prepacked GEMM panels, ...). Called once per layer at load time; the reference keeps the tensor."""
    return weight


def linear(x: torch.Tensor, weight: PackedLinearWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``. ``weight`` is either a plain ``[out, in]`` tensor or what this platform's
    ``pack_linear_weight`` returned; an override must accept both."""
    return F.linear(x, weight, bias)


def pack_gated_linear_weight(weight: torch.Tensor, bias: torch.Tensor | None = None
                             ) -> tuple[PackedLinearWeight, torch.Tensor | None] | None:
    """The SwiGLU projection's fused ``[2 * d, in]`` weight (gate rows first, then up) and its bias, in whatever
    layout the platform's ``gated_linear`` takes, or ``None`` when the platform has no fused kernel for this shape:
    then the MLP runs ``linear`` and ``silu_and_mul``. The reference has none. Called once per layer at load."""
    return None


def gated_linear(x: torch.Tensor, weight: PackedLinearWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu_and_mul(x @ weight.T + bias)`` in one op, so a platform can apply the activation to the GEMM's
    result while it is still in registers and never write the ``2 * d``-wide intermediate. ``weight`` is a plain
    ``[2 * d, in]`` tensor or what this platform's ``pack_gated_linear_weight`` returned."""
    return silu_and_mul(F.linear(x, weight, bias))


def pack_fused_moe_weights(w13: torch.Tensor, w2: torch.Tensor, activation: str = "silu"
                           ) -> tuple[PackedLinearWeight, PackedLinearWeight] | None:
    """A MoE layer's stacked expert weights (``w13`` [E, 2 * I, H], ``w2`` [E, H, I]) in whatever layout the
    platform's ``fused_moe`` takes for ``activation``, or ``None`` to keep them plain. Called once per layer at
    load; where it accepts, core releases the plain weights and passes the pair to ``fused_moe`` every step. The
    reference declines."""
    return None


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """The experts of a sparse MoE layer: each token's output is the sum over its chosen experts ``e`` (``topk_ids``
    [T, k]) of ``topk_weights[t, j] * w2[e] @ (act(gate) * up)`` with ``gate|up = w13[e] @ hidden[t]``; ``w13`` is
    [E, 2 * I, H] (gate rows first), ``w2`` is [E, H, I]. Experts are visited in ascending order and accumulated in
    the hidden dtype, as transformers does, so a token's result never depends on the other tokens of the batch.
    ``w13`` and ``w2`` are plain tensors or the pair this platform's ``pack_fused_moe_weights`` returned; an
    override must accept both."""
    from transformers.activations import ACT2FN

    act = F.silu if activation in ("silu", "swish") else ACT2FN[activation]
    out = torch.zeros_like(hidden)
    inter = w2.shape[-1]
    for e in torch.unique(topk_ids).tolist():
        rows, slot = torch.where(topk_ids == e)
        h = F.linear(hidden[rows], w13[e])
        h = F.linear(act(h[:, :inter]) * h[:, inter:], w2[e])
        out.index_add_(0, rows, (h * topk_weights[rows, slot, None]).to(hidden.dtype))
    return out


def lora_shrink_expand(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       token_slots: torch.Tensor, active_slots: tuple[int, ...],
                       ranks: torch.Tensor | None = None) -> None:
    """``y[t] += (x[t] @ a[s].T) @ b[s]`` in place for every token ``t`` whose adapter slot ``s =
    token_slots[t]`` is one of ``active_slots`` (punica's shrink, then expand, by adapter index), so one batch mixes
    adapters and base-model rows (slot -1; every slot >= 0 in ``token_slots`` is in ``active_slots``, so a kernel
    may read the slots from ``token_slots`` alone). ``a`` [slots, max_rank, in], ``b`` [slots, max_rank, out]
    (B transposed, so each rank row is contiguous along the outputs);
    ``y`` may be a column view of a merged projection's output. ``ranks`` (int32 [slots], on ``a``'s device) is
    each slot's real rank: ``a``'s and ``b``'s rows past it are zero, so a kernel may skip them (0: nothing
    to add for that slot); this reference computes the padded part, which adds exact zeros, to need no
    device-to-host read."""
    for slot in active_slots:
        rows = (token_slots == slot).nonzero().squeeze(1)
        if rows.numel():
            y.index_add_(0, rows, (x.index_select(0, rows) @ a[slot].t()) @ b[slot])


OP_NAMES: tuple[str, ...] = (
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "apply_top_k_top_p",
    "apply_min_p",
    "greedy_sample",
    "sampled_logprobs",
    "sample_softmax",
    "pack_linear_weight",
    "linear",
    "pack_gated_linear_weight",
    "gated_linear",
    "pack_fused_moe_weights",
    "fused_moe",
    "lora_shrink_expand",
)
