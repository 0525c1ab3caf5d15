"""Per-request token controls applied by the sampler: ``allowed_token_ids``, ``bad_words``, ``logit_bias`` and
custom ``logits_processors`` (vLLM's names and semantics).

The sampler calls :func:`apply_logits_controls` only when some row of the batch sets a control, so a batch
without any pays one flag check per row and builds no tensors. When rows do use one, each control is one
batched tensor operation over those rows; only the user's own callables run per row.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from llmctl.sampling_params import SamplingParams


class SampleRow(Protocol):
    """What the sampler reads from a row: a ``Request``, or a view of one at a draft position."""

    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    eos_token_ids: tuple[int, ...]
    generator: torch.Generator | None

    @property
    def output_token_ids(self) -> list[int]: ...


def rows_with_controls(rows: Sequence[SampleRow]) -> list[int]:
    return [i for i, r in enumerate(rows) if r.sampling_params.has_logits_controls]


def apply_allowed_token_ids(logits: torch.Tensor, rows: Sequence[SampleRow], idx: list[int]) -> None:
    """Everything outside a row's ``allowed_token_ids`` gets -inf."""
    sel = [i for i in idx if rows[i].sampling_params.allowed_token_ids]
    if not sel:
        return
    vocab = logits.shape[1]
    row_pos, cols = [], []
    for j, i in enumerate(sel):
        ids = rows[i].sampling_params.allowed_token_ids
        row_pos.extend([j] * len(ids))
        cols.extend(ids)
    banned = torch.ones((len(sel), vocab), dtype=torch.bool, device=logits.device)
    banned[torch.tensor(row_pos, device=logits.device), torch.tensor(cols, device=logits.device)] = False
    sel_t = torch.tensor(sel, device=logits.device)
    logits[sel_t] = logits[sel_t].masked_fill(banned, float("-inf"))


def bad_word_bans(output_ids: list[int], bad_words_ids: list[list[int]]) -> list[int]:
    """Tokens that would complete a bad word: a one-token word always, a longer one when the output ends with
    all its tokens but the last (as vLLM does)."""
    banned = []
    for word in bad_words_ids:
        prefix = word[:-1]
        if not prefix or (len(output_ids) >= len(prefix) and output_ids[len(output_ids) - len(prefix):] == prefix):
            banned.append(word[-1])
    return banned


def apply_bad_words(logits: torch.Tensor, rows: Sequence[SampleRow], idx: list[int]) -> None:
    row_pos, cols = [], []
    for i in idx:
        words = rows[i].sampling_params._bad_words_token_ids
        if words:
            ban = bad_word_bans(rows[i].output_token_ids, words)
            row_pos.extend([i] * len(ban))
            cols.extend(ban)
    if cols:
        logits[torch.tensor(row_pos, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SampleRow], idx: list[int]) -> None:
    row_pos, cols, vals = [], [], []
    for i in idx:
        bias = rows[i].sampling_params.logit_bias
        if bias:
            row_pos.extend([i] * len(bias))
            cols.extend(bias.keys())
            vals.extend(bias.values())
    if cols:
        dev = logits.device
        logits.index_put_((torch.tensor(row_pos, device=dev), torch.tensor(cols, device=dev)),
                          torch.tensor(vals, dtype=logits.dtype, device=dev), accumulate=True)


def call_logits_processor(fn: Callable[..., Any], prompt_ids: list[int], output_ids: list[int],
                          logits: torch.Tensor) -> torch.Tensor:
    """vLLM's two signatures: ``fn(output_ids, logits)`` or ``fn(prompt_ids, output_ids, logits)``."""
    try:
        n_params = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        n_params = 2
    out = fn(prompt_ids, output_ids, logits) if n_params >= 3 else fn(output_ids, logits)
    if not isinstance(out, torch.Tensor) or out.shape != logits.shape:
        raise ValueError(f"logits_processors: {getattr(fn, '__name__', fn)!r} must return a tensor of shape "
                         f"{tuple(logits.shape)}, got {type(out).__name__}")
    return out


def apply_custom_processors(logits: torch.Tensor, rows: Sequence[SampleRow], idx: list[int]) -> None:
    for i in idx:
        r = rows[i]
        for fn in r.sampling_params.logits_processors or ():
            logits[i] = call_logits_processor(fn, list(r.prompt_token_ids), list(r.output_token_ids),
                                              logits[i].clone()).to(logits.dtype)


def apply_logits_controls(logits: torch.Tensor, rows: Sequence[SampleRow], idx: list[int]) -> torch.Tensor:
    """Applies every control in place on the float32 ``logits`` for the rows ``idx`` that set one."""
    apply_allowed_token_ids(logits, rows, idx)
    apply_bad_words(logits, rows, idx)
    apply_logit_bias(logits, rows, idx)
    apply_custom_processors(logits, rows, idx)
    return logits


def tokenize_bad_words(tokenizer: Any, bad_words: list[str]) -> list[list[int]]:
    """Each word as it would appear at the start of the text and after a space (vLLM's rule: the spaced form
    counts only when it is a different token sequence of the same length)."""
    out: list[list[int]] = []
    for word in bad_words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if plain:
            out.append(list(plain))
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and plain and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(list(spaced))
    return out
