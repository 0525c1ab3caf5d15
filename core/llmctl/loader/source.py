"""Resolve the user's ``model`` string to files on disk and the Hugging Face config that describes them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Everything needed to run a safetensors checkpoint, nothing else: pickled formats (.bin/.pt) can execute
# code on load and other frameworks' weights would only cost bandwidth.
HUB_ALLOW_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "*.safetensors",
    "model.safetensors.index.json",
)


@dataclass
class ModelSource:
    model: str  # what the user asked for, kept for messages
    local_dir: Path
    gguf_file: str | None  # file name inside local_dir when the weights are a GGUF file
    hf_config: Any
    generation_config: dict[str, Any] | None


def resolve_model(model: str, revision: str | None = None, trust_remote_code: bool = False,
                  download_dir: str | None = None, hf_overrides: dict[str, Any] | None = None) -> ModelSource:
    """``download_dir`` replaces the Hugging Face cache for hub downloads; ``hf_overrides`` are set on the config
    (nested dicts update nested configs such as ``text_config``), as vLLM's ``--hf-overrides`` does."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model: {model!r} is a file but not a .gguf; pass a checkpoint directory instead")
        source = _from_gguf(model, path.resolve())
    elif path.is_dir():
        source = _from_dir(model, path.resolve(), revision, trust_remote_code)
    elif _looks_like_path(model):
        raise ValueError(f"model: path {model!r} not found (no such file or directory)")
    else:
        source = _from_dir(model, _download(model, revision, download_dir), None, trust_remote_code)
    if hf_overrides:
        apply_hf_overrides(source.hf_config, hf_overrides)
    return source


def apply_hf_overrides(hf_config: Any, overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        current = getattr(hf_config, key, None)
        if isinstance(value, dict) and current is not None and hasattr(current, "to_dict"):
            apply_hf_overrides(current, value)
        else:
            setattr(hf_config, key, value)


def _looks_like_path(model: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a mistyped path."""
    return model.startswith((".", "/", "~", "\\")) or model.endswith(".gguf") or model.count("/") > 1


def _from_dir(model: str, local_dir: Path, revision: str | None, trust_remote_code: bool) -> ModelSource:
    if not (local_dir / "config.json").exists():
        ggufs = sorted(local_dir.glob("*.gguf"))
        if len(ggufs) == 1:
            return _from_gguf(model, ggufs[0])
        raise ValueError(f"model: {model!r} has no config.json"
                         + (f" and several .gguf files ({', '.join(g.name for g in ggufs)}); pass one of them"
                            if ggufs else ""))
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(local_dir), trust_remote_code=trust_remote_code)
    except ValueError as exc:
        config_json = json.loads((local_dir / "config.json").read_text())
        unknown_type = "auto_map" not in config_json and "trust_remote_code" not in str(exc)
        if "model_type" in config_json and (unknown_type or _runs_natively(config_json)):
            # A model type this transformers does not know, or one whose config class is remote code that llmctl
            # does not need (a native architecture such as InternLM2): keep the plain config, so a native class or
            # a plugin that registers the architecture can still run it and everything else fails listing what is
            # supported.
            from transformers import PretrainedConfig

            hf_config = PretrainedConfig.from_pretrained(str(local_dir))
            hf_config.model_type = config_json["model_type"]
            gen_path = local_dir / "generation_config.json"
            generation_config = json.loads(gen_path.read_text()) if gen_path.exists() else None
            return ModelSource(model, local_dir, None, hf_config, generation_config)
        if ("trust_remote_code" in str(exc) or "auto_map" in config_json) and not trust_remote_code:
            raise ValueError(f"model: {model!r} needs custom code from its repository (config.json's auto_map); "
                             f"trust_remote_code is off by default: pass --trust-remote-code (trust_remote_code=True) "
                             f"only if you trust that code") from None
        raise
    gen_path = local_dir / "generation_config.json"
    generation_config = json.loads(gen_path.read_text()) if gen_path.exists() else None
    return ModelSource(model, local_dir, None, hf_config, generation_config)


def _runs_natively(config_json: dict[str, Any]) -> bool:
    """Every architecture config.json names has a native llmctl class, so its remote code is never run."""
    from llmctl.models.supported import MODELS

    archs = config_json.get("architectures") or []
    return bool(archs) and all(a in {m.architecture for m in MODELS} for a in archs)


def _from_gguf(model: str, path: Path) -> ModelSource:
    from llmctl.loader.gguf_file import open_gguf
    from llmctl.loader.gguf_hf import build_hf_config

    # Parsed once per process (cached): the weights and the tokenizer read the same parse.
    hf_config = build_hf_config(open_gguf(path))
    if hf_config is None:  # an architecture llmctl does not rebuild itself: transformers' (slower) GGUF path
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if not getattr(hf_config, "architectures", None):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        # GGUF metadata names the model type only; the causal-LM class is its canonical architecture.
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf_config.model_type)
        if arch is not None:
            hf_config.architectures = [arch]
    return ModelSource(model, path.parent, path.name, hf_config, None)


def hub_cache_dir() -> Path:
    """Read at call time (not at import, as huggingface_hub does) so HF_HOME/HF_HUB_CACHE set by the caller
    after import still apply."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _download(repo_id: str, revision: str | None, download_dir: str | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hub_offline()
    cache = Path(download_dir).expanduser() if download_dir else hub_cache_dir()
    try:
        local = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline,
                                  allow_patterns=list(HUB_ALLOW_PATTERNS))
    except HFValidationError as e:
        raise ValueError(f"model: {repo_id!r} not found: not a local path and not a valid Hub repo id") from e
    except GatedRepoError as e:
        raise ValueError(f"model: {repo_id!r} is gated on the Hub; accept its license and set HF_TOKEN") from e
    except RevisionNotFoundError as e:
        raise ValueError(f"model: revision {revision!r} of {repo_id!r} not found on the Hub") from e
    except RepositoryNotFoundError as e:
        raise ValueError(f"model: {repo_id!r} not found locally or on the Hub (or it is private: set HF_TOKEN)") from e
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise ValueError(f"model: {repo_id!r} not found in the local Hugging Face cache ({cache}) and {why}; "
                         f"download it first or pass a local path") from e
    except OSError as e:  # connection errors surface as OSError subclasses
        raise ValueError(f"model: could not download {repo_id!r}: {e}") from e
    return Path(local)
