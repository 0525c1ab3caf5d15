"""Stream a checkpoint's tensors under their Hugging Face names, one at a time, so peak memory stays near
one tensor above the model itself."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from llmctl.loader.source import ModelSource

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(local_dir: Path) -> list[Path]:
    index = local_dir / INDEX_FILE
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [local_dir / name for name in sorted(set(weight_map.values()))]
    return sorted(local_dir.glob("*.safetensors"))


class LazyTensor:
    """A safetensors tensor not read yet: a tensor-parallel rank reads only its slice of it (``read_slice``), so
    no rank reads, or holds for a moment, the whole of a sharded matrix. Valid only while the iterator that
    yielded it has not moved on (the file is open for that long)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.shape = tuple(handle.get_shape())

    def read(self) -> torch.Tensor:
        return self._handle[:] if self.shape else self._handle[()]

    def read_slice(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._handle[tuple(index)]


def iter_weights(source: ModelSource, keep_quantized: Callable[[str], bool] | None = None, lazy: bool = False
                 ) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
    """``keep_quantized`` (GGUF only): HF names whose blocks are handed over raw, for a quantization method.
    ``lazy``: safetensors tensors come as :class:`LazyTensor`, GGUF blocks kept quantized as ``LazyBlocks``
    (the other GGUF tensors are dequantized whole either way)."""
    if source.gguf_file is not None:
        yield from _iter_gguf(source, keep_quantized, lazy)
        return
    files = safetensors_files(source.local_dir)
    if not files:
        raise ValueError(f"model: no *.safetensors weights in {source.local_dir}; only safetensors and GGUF "
                         f"checkpoints are loaded (pickled .bin/.pt files are refused)")
    yield from _iter_safetensors(files, lazy)


def _iter_safetensors(files: list[Path], lazy: bool = False) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:  # memory-mapped: read on access
            for name in f.keys():
                yield name, LazyTensor(f.get_slice(name)) if lazy else f.get_tensor(name)


def _iter_gguf(source: ModelSource, keep_quantized: Callable[[str], bool] | None = None, lazy: bool = False
               ) -> Iterator[tuple[str, Any]]:
    """Dequantized one tensor at a time from the memory-mapped file, under Hugging Face names and with
    llama.cpp's q/k row permutation undone, so the result equals what transformers' ``from_pretrained`` loads.
    Architectures llmctl does not map itself go through transformers' loader."""
    from llmctl.loader.gguf_file import open_gguf
    from llmctl.loader.gguf_hf import FAST_ARCHS, MAPPED_ARCHS, iter_hf_tensors, iter_mapped_tensors

    path = source.local_dir / str(source.gguf_file)
    g = open_gguf(path)
    if g.architecture in FAST_ARCHS:
        yield from iter_hf_tensors(g, keep_quantized, lazy)  # lazy: raw blocks read by the rank's rows
        return
    if g.architecture in MAPPED_ARCHS and keep_quantized is not None:
        yield from iter_mapped_tensors(g, source.hf_config, keep_quantized, lazy)
        return
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(source.hf_config)
    tensors: dict[str, torch.Tensor] = load_gguf_checkpoint(str(path), return_tensors=True,
                                                             model_to_load=skeleton)["tensors"]
    del skeleton
    for name in list(tensors):
        yield name, tensors.pop(name)
