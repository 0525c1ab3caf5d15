"""Which runner a checkpoint needs, and what its sentence-transformers files say about pooling.

sentence-transformers saves a model as a pipeline (``modules.json``): the transformer, a ``Pooling`` module
(``1_Pooling/config.json``: CLS, mean or last-token) and optionally ``Normalize``; ``sentence_bert_config.json``
caps the sequence length. Those files are what makes a checkpoint an embedding model, so they decide both the
runner and the pooler. A module we cannot reproduce (a Dense projection, say) is refused by name rather than
silently skipped, since the embeddings would then be wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.pooling.pooler import PoolerConfig

RUNNERS = ("auto", "generate", "pooling")
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING_MODES = {  # 1_Pooling/config.json switch -> our pooling type
    "pooling_mode_cls_token": "CLS",
    "pooling_mode_mean_tokens": "MEAN",
    "pooling_mode_lasttoken": "LAST",
}


@dataclass(frozen=True)
class SentenceTransformersConfig:
    pooler: PoolerConfig
    max_seq_length: int | None = None


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_sentence_transformers_config(model_dir: Path) -> SentenceTransformersConfig | None:
    """``None`` when the directory is not a sentence-transformers model."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return None
    pooling_type: str | None = None
    normalize = False
    for module in _read_json(modules_file):
        kind = module.get("type", "")
        if kind == _ST_TRANSFORMER:
            continue
        if kind == _ST_NORMALIZE:
            normalize = True
        elif kind == _ST_POOLING:
            cfg = _read_json(model_dir / module.get("path", "") / "config.json")
            modes = [ours for key, ours in _POOLING_MODES.items() if cfg.get(key)]
            others = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k not in _POOLING_MODES]
            if others or len(modes) != 1:
                raise ValueError(f"model: sentence-transformers pooling {', '.join(others + modes) or '(none)'} is "
                                 f"not supported; CLS, mean or last-token pooling alone is")
            pooling_type = modes[0]
        else:
            raise ValueError(f"model: sentence-transformers module {kind or module.get('name')!r} is not supported "
                             f"(Transformer, Pooling and Normalize are)")
    max_len = None
    st_file = model_dir / "sentence_bert_config.json"
    if st_file.is_file():
        max_len = _read_json(st_file).get("max_seq_length")
    return SentenceTransformersConfig(PoolerConfig(pooling_type, normalize), int(max_len) if max_len else None)


def is_pooling_architecture(arch: str, registry: Any) -> bool:
    entry = registry.models.get(arch)
    return entry is not None and bool(getattr(entry.item.model_cls, "is_pooling_model", False))


def resolve_runner(requested: str, hf_config: Any, model_dir: Path, registry: Any) -> str:
    """``generate`` or ``pooling``: as asked, else pooling when the checkpoint is a sentence-transformers model or
    its architecture is one only a pooling model implements (BertModel, ...ForSequenceClassification)."""
    if requested not in RUNNERS:
        raise ValueError(f"runner: must be one of {', '.join(RUNNERS)}, got {requested!r}")
    if requested != "auto":
        return requested
    if (model_dir / "modules.json").is_file():
        return "pooling"
    archs = list(getattr(hf_config, "architectures", None) or [])
    if archs and all(is_pooling_architecture(a, registry) or a.endswith("ForSequenceClassification") for a in archs):
        return "pooling"
    return "generate"


def pooling_model_class(hf_config: Any, registry: Any) -> Any:
    """The pooling model for a checkpoint's architecture. A decoder saved for generation (``Qwen3ForCausalLM``)
    runs as the embedding model of its family (``Qwen3Model``), as Qwen3-Embedding checkpoints expect."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        for name in (arch, arch.replace("ForCausalLM", "Model")):
            if is_pooling_architecture(name, registry):
                return registry.models[name].item.model_cls
    supported = ", ".join(sorted(a for a in registry.models if is_pooling_architecture(a, registry)))
    asked = " / ".join(archs) if archs else "(none named in config.json)"
    raise ValueError(f"model: architecture {asked} cannot run as a pooling model (runner='pooling'); "
                     f"supported: {supported or 'none'}")
