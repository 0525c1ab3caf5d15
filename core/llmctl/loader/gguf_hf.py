"""Hugging Face views of a parsed GGUF file: the transformers config, the tensors under HF names, the tokenizer.

Each is built from the one ``GGUFFile`` parse (see ``gguf_file``) and equals what transformers' own GGUF path
produces (``AutoConfig``/``AutoTokenizer``/``from_pretrained`` with ``gguf_file=``), which parses the file once
per use and derives the tensor-name map from a model skeleton. Architectures outside ``FAST_ARCHS`` return
``None`` here and the callers fall back to transformers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmctl.loader.gguf_file import GGUFFile

# GGUF ``general.architecture`` values whose config, tensor names and tokenizer are handled here.
FAST_ARCHS = frozenset({"llama", "qwen2", "qwen3"})
# Architectures whose config and tokenizer come from transformers' GGUF reader, and whose tensors are named as
# transformers names them, but whose projections may stay in their blocks: transformers' tensor processor for
# them changes no projection (none at all, or a norm's offset), unlike Bloom's q/k/v reshuffle, GPT-2's
# transposes or the MoE files' expert stacks, which stay dequantized at load.
MAPPED_ARCHS = frozenset({"gemma2", "gemma3", "starcoder2", "stablelm", "phi3"})
KEPT_QUANTIZED_ARCHS = FAST_ARCHS | MAPPED_ARCHS

# Per-block llama.cpp tensor names -> the HF module path inside ``model.layers.N``.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Present in some files, with no HF counterpart (transformers drops them too): llama3 RoPE frequency factors
# (the config's rope_scaling recomputes them).
_IGNORED = frozenset({"rope_freqs"})
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)")
_TOP_RE = re.compile(r"([a-z0-9_]+)\.(weight|bias)")


def _config_arch(g: GGUFFile) -> tuple[str, str]:
    """(file architecture, transformers model_type). llama.cpp writes Mistral as ``llama``; transformers calls
    it mistral only when ``general.name`` is exactly "mistral", and so do we."""
    arch = g.architecture
    if arch == "llama" and g.metadata.get("general.name") == "mistral":
        return arch, "mistral"
    return arch, arch


def hf_config_dict(g: GGUFFile) -> dict[str, Any] | None:
    """The dict transformers' GGUF path feeds to the config class, or None outside ``FAST_ARCHS``."""
    if g.architecture not in FAST_ARCHS:
        return None
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch, model_type = _config_arch(g)
    if model_type not in GGUF_CONFIG_MAPPING:
        return None
    out: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in g.tensors}
    for key, value in g.metadata.items():
        # transformers renames the architecture anywhere in keys and string values (llama -> mistral), then
        # looks the rest of the key up under its first component: general, the model type, tokenizer (ids).
        if arch != model_type:
            key = key.replace(arch, model_type)
        prefix, _, rest = key.partition(".")
        renames = GGUF_CONFIG_MAPPING.get(prefix)
        if renames is None or rest not in renames:
            continue
        target = renames[rest]
        if target is None or target == -1:
            continue
        if isinstance(value, list) and len(value) == 1:
            value = value[0]  # one-element arrays are unwrapped like scalars
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, model_type)
        out[target] = value
    if "vocab_size" not in out and isinstance(g.metadata.get("tokenizer.ggml.tokens"), list):
        out["vocab_size"] = len(g.metadata["tokenizer.ggml.tokens"])
    return out


def build_hf_config(g: GGUFFile) -> Any | None:
    config_dict = hf_config_dict(g)
    if config_dict is None:
        return None
    from transformers import AutoConfig

    config = AutoConfig.for_model(**config_dict)
    config._name_or_path = str(g.path.parent)  # what from_pretrained(dir, gguf_file=...) records
    return config


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF parameter name for a llama.cpp tensor name, None for tensors HF models do not have; raises on
    names this table does not know (an unknown tensor silently dropped would be a wrong model)."""
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is not None:
        part = _BLOCK_NAMES.get(m[2])
        if part is not None:
            return f"model.layers.{m[1]}.{part}.{m[3]}"
        base = m[2]
    else:
        m = _TOP_RE.fullmatch(gguf_name)
        base = m[1] if m is not None else gguf_name
        if m is not None and base in _TOP_NAMES:
            return f"{_TOP_NAMES[base]}.{m[2]}"
    if base in _IGNORED:
        return None
    raise ValueError(f"model: GGUF tensor {gguf_name!r} has no Hugging Face counterpart known to llmctl")


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row interleave of a q/k projection: rows are stored per head as
    (half, 2) pairs, HF keeps them as (2, half)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class LazyBlocks:
    """A block-quantized tensor's raw rows in the memory map, not read yet: a tensor-parallel rank reads only its
    rows (after llama.cpp's q/k row order is undone) or its byte columns (whole blocks) of each row, like
    ``llmctl.loader.weights.LazyTensor`` for safetensors."""

    def __init__(self, blocks: np.ndarray, n_head: int | None) -> None:
        self._blocks = blocks  # read-only view of the map
        self._rows = None if n_head is None else _unpermute_rows(np.arange(blocks.shape[0]), n_head)
        self.shape = tuple(blocks.shape)

    def read(self) -> torch.Tensor:
        return self.read_slice(0, 0, self.shape[0])

    def read_slice(self, dim: int, start: int, length: int) -> torch.Tensor:
        b = self._blocks
        if dim == 0:
            rows = np.arange(start, start + length) if self._rows is None else self._rows[start:start + length]
            return torch.from_numpy(b[rows])  # fancy indexing copies just those rows out of the map
        cols = b[:, start:start + length]
        return torch.from_numpy(np.ascontiguousarray(cols.copy() if self._rows is None else cols[self._rows]))


def iter_hf_tensors(g: GGUFFile, keep_quantized: Callable[[str], bool] | None = None, lazy: bool = False
                    ) -> Iterator[tuple[str, torch.Tensor | LazyBlocks]]:
    """(HF name, tensor) one at a time, dequantized as read (float32 for quantized and F16 data); tensors for
    which ``keep_quantized(hf_name)`` holds come as their raw blocks instead (uint8 ``[rows, row_bytes]``, rows
    unpermuted like the values), as :class:`LazyBlocks` with ``lazy``."""
    # As transformers does: by file architecture (so Mistral files written as llama too), with head counts the
    # file states (no permutation when it omits one).
    n_head = g.metadata.get(f"{g.architecture}.attention.head_count")
    n_kv = g.metadata.get(f"{g.architecture}.attention.head_count_kv")
    permute = g.architecture == "llama" and isinstance(n_head, int) and isinstance(n_kv, int)
    for gguf_name in g.tensors:
        name = hf_tensor_name(gguf_name)
        if name is None:
            continue
        raw = keep_quantized is not None and keep_quantized(name)
        w = g.raw(gguf_name) if raw else g.dequantize(gguf_name)
        if raw and lazy:
            heads = (n_head if ".attn_q." in gguf_name else n_kv if ".attn_k." in gguf_name else None) \
                if permute else None
            yield name, LazyBlocks(w, heads)
            continue
        if permute:
            if ".attn_q." in gguf_name:
                w = _unpermute_rows(w, n_head)
            elif ".attn_k." in gguf_name:
                w = _unpermute_rows(w, n_kv)
        if not w.flags.writeable:  # a view of the read-only map (F32 data): torch needs its own memory
            w = w.copy()
        yield name, torch.from_numpy(w)


def _processor(g: GGUFFile, hf_config: Any) -> Any:
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(g.architecture, TensorProcessor)(config=hf_config.to_dict())


def mapped_tensor_names(g: GGUFFile, hf_config: Any) -> dict[str, str]:
    """llama.cpp tensor name -> Hugging Face parameter name, for every tensor the model has: this module's table
    for ``FAST_ARCHS``, transformers' map (gguf's name table over a skeleton of the model, on the meta device)
    for the others."""
    if g.architecture in FAST_ARCHS:
        return {n: hf for n in g.tensors if (hf := hf_tensor_name(n)) is not None}
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    return {n: hf for n, hf in get_gguf_hf_weights_map(skeleton, _processor(g, hf_config)).items()
            if n in g.tensors}


def iter_mapped_tensors(g: GGUFFile, hf_config: Any, keep_quantized: Callable[[str], bool], lazy: bool = False
                        ) -> Iterator[tuple[str, torch.Tensor | LazyBlocks]]:
    """As :func:`iter_hf_tensors` for ``MAPPED_ARCHS``: names and dequantized values as transformers' GGUF reader
    gives them (its tensor processor applied), the projections ``keep_quantized`` names as raw blocks."""
    names = mapped_tensor_names(g, hf_config)
    processor = _processor(g, hf_config)
    for gguf_name, name in names.items():
        if keep_quantized(name):
            w = g.raw(gguf_name)
            if lazy:
                yield name, LazyBlocks(w, None)
                continue
        else:
            w = processor.process(weights=g.dequantize(gguf_name), name=gguf_name, tensor_key_mapping=names,
                                  parsed_parameters={"config": hf_config.to_dict()}).weights
        if not w.flags.writeable:
            w = w.copy()
        yield name, torch.from_numpy(w)


# GGUF special-token id keys, by tokenizer attribute.
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}


def tokenizer_inputs(g: GGUFFile) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer_dict for ``convert_gguf_tokenizer``, init kwargs for the tokenizer class), as transformers'
    ``get_gguf_tokenizer`` derives them from the file."""
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING

    md = g.metadata
    groups = []
    for renames in (GGUF_TOKENIZER_MAPPING["tokenizer"], GGUF_TOKENIZER_MAPPING["tokenizer_config"]):
        groups.append({attr: md[f"tokenizer.{key}"] for key, attr in renames.items() if f"tokenizer.{key}" in md})
    tok_dict, tok_config = groups
    kind = tok_dict.get("tokenizer_type")
    if kind == "llama":
        tok_config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
    elif kind == "gemma4":
        tok_config["add_bos_token"] = False
    tokens = tok_dict.get("tokens") or []
    for attr, key in _SPECIAL_IDS.items():
        idx = md.get(f"tokenizer.ggml.{key}")
        tok_config[attr] = tokens[idx] if idx is not None else None
    return tok_dict, tok_config


def build_tokenizer(g: GGUFFile, name_or_path: Path) -> Any | None:
    """The tokenizer ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` returns, built from the parsed
    metadata; None when that call would take another route (a tokenizer_config.json next to the file)."""
    if (name_or_path / "tokenizer_config.json").exists() or "tokenizer.ggml.tokens" not in g.metadata:
        return None
    from transformers.integrations.gguf import convert_gguf_tokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    tok_dict, tok_config = tokenizer_inputs(g)
    backend, extra = convert_gguf_tokenizer(g.architecture, tok_dict)
    tok_config.update(extra)
    return TokenizersBackend(tokenizer_object=backend, name_or_path=str(name_or_path), **tok_config)
