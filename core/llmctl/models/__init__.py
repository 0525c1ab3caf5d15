"""Native model architectures (the table lives in :mod:`llmctl.models.supported`)."""

from __future__ import annotations

from llmctl.plugins.types import ModelArchitecture


def native_architectures() -> list[ModelArchitecture]:
    from llmctl.models.supported import native_architectures as _native

    return _native() + pooling_architectures()


def pooling_architectures() -> list[ModelArchitecture]:
    """Encoders and decoder embedding models; they run only with ``runner="pooling"``."""
    from llmctl.models import bert, clip_text, decoder_pooling

    return ([ModelArchitecture(name, cls) for name, cls in bert.ARCHITECTURES.items()] +
            [ModelArchitecture(name, decoder_pooling.DecoderEmbeddingModel) for name in decoder_pooling.ARCHITECTURES] +
            [ModelArchitecture(name, cls) for name, cls in clip_text.ARCHITECTURES.items()])
