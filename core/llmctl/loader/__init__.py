"""Finding a model (local directory, local GGUF file, or Hugging Face Hub repo), its tokenizer and its
weights, and building the native model class for it."""

from llmctl.loader.model_loader import get_model_class, load_model, resolve_dtype
from llmctl.loader.source import ModelSource, resolve_model
from llmctl.loader.tokenizer import load_tokenizer
from llmctl.loader.weights import iter_weights

__all__ = [
    "ModelSource",
    "get_model_class",
    "iter_weights",
    "load_model",
    "load_tokenizer",
    "resolve_dtype",
    "resolve_model",
]
