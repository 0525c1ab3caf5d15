"""The tokenizer that goes with a model (or an explicit override)."""

from __future__ import annotations

from typing import Any

from llmctl.loader.source import ModelSource, resolve_model


def load_tokenizer(source: ModelSource, tokenizer: str | None = None, revision: str | None = None,
                   trust_remote_code: bool = False) -> Any:
    """A GGUF file carries its own vocabulary and chat template, so it is its own tokenizer source unless the
    user names another one."""
    from transformers import AutoTokenizer

    if tokenizer is not None:
        tok_source = resolve_model(tokenizer, revision=revision, trust_remote_code=trust_remote_code)
    else:
        tok_source = source
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if tok_source.gguf_file is not None:
        kwargs["gguf_file"] = tok_source.gguf_file
    try:
        if tok_source.gguf_file is not None:
            fast = _gguf_tokenizer(tok_source)
            if fast is not None:
                return fast
        return AutoTokenizer.from_pretrained(str(tok_source.local_dir), **kwargs)
    except (OSError, ValueError) as e:
        field = "tokenizer" if tokenizer is not None else "model"
        raise ValueError(f"{field}: could not load a tokenizer from {tok_source.model!r}: {e}") from e


def _gguf_tokenizer(source: ModelSource) -> Any:
    """Built from the process-wide parse of the file (the one the config and weights came from), or None to
    let transformers read the file itself."""
    from llmctl.loader.gguf_file import open_gguf
    from llmctl.loader.gguf_hf import build_tokenizer

    return build_tokenizer(open_gguf(source.local_dir / str(source.gguf_file)), source.local_dir)
