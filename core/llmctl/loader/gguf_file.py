"""A GGUF file parsed once per process: its metadata, its tensor table, and its tensors dequantized on demand.

The gguf package's ``GGUFReader`` builds a numpy view per metadata element, which for a 49k-token vocabulary
costs seconds, and transformers parses the file again for the config, the weights and the tokenizer. Here the
header is walked with ``struct`` over an ``mmap`` (a string array in one tight loop), the result is cached by
path, mtime and size, and tensor data stays in the map until a tensor is asked for. Dequantization itself is
the gguf package's (``gguf.quants.dequantize``), so values match what transformers loads bit for bit.

Layout (GGUF v2/v3, little-endian): ``b"GGUF"``, u32 version, u64 tensor count, u64 key/value count; then
each key/value as (string key, u32 type, value); then each tensor as (string name, u32 n_dims, u64 dims[n],
u32 ggml type, u64 offset into the data section); then the data section at the next multiple of
``general.alignment`` (default 32). A string is a u64 byte length and UTF-8 bytes; an array is u32 element
type, u64 count and the elements.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# GGUF metadata value types.
_T_STRING, _T_ARRAY = 8, 9
# Fixed-size scalar types: struct format char and width.
_SCALAR: dict[int, tuple[str, int]] = {
    0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
    6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8),
}

# ggml types stored as plain values (not blocks), as GGUFReader exposes them.
_PLAIN_NP: dict[int, Any] = {0: np.float32, 1: np.float16, 16: np.int8, 17: np.int16, 18: np.int32,
                             27: np.int64, 28: np.float64}

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy/torch order (slowest-moving first)
    ggml_type: int
    data_offset: int  # absolute byte offset in the file
    n_bytes: int


class GGUFFile:
    """Metadata as plain Python values (string arrays as ``list[str]``, numeric arrays as ``list``), the tensor
    table, and read-only access to each tensor's bytes through a shared memory map."""

    def __init__(self, path: Path, metadata: dict[str, Any], tensors: dict[str, GGUFTensorInfo],
                 mm: mmap.mmap, version: int) -> None:
        self.path = path
        self.metadata = metadata
        self.tensors = tensors
        self.version = version
        self._mm = mm

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored array (read-only, backed by the map), shaped as ``GGUFReader`` shapes it: values
        for plain types, ``(..., bytes per row)`` uint8 for block-quantized ones."""
        info = self.tensors[name]
        plain = _PLAIN_NP.get(info.ggml_type)
        if plain is not None:
            return np.frombuffer(self._mm, dtype=plain, count=prod(info.shape),
                                 offset=info.data_offset).reshape(info.shape)
        from gguf.quants import quant_shape_to_byte_shape

        byte_shape = quant_shape_to_byte_shape(info.shape, _qtype(info.ggml_type))
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.n_bytes,
                             offset=info.data_offset).reshape(byte_shape)

    def dequantize(self, name: str) -> np.ndarray:
        """float32 values (float16 files give float32 too, as gguf's dequantize does)."""
        from gguf.quants import dequantize

        info = self.tensors[name]
        return dequantize(self.raw(name), _qtype(info.ggml_type))


def _qtype(ggml_type: int) -> Any:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(ggml_type)


_CACHE: dict[tuple[str, int, int], GGUFFile] = {}
_LOCK = threading.Lock()


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """The parsed file, shared by everything in this process that asks for the same unchanged file."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    key = (str(resolved), st.st_mtime_ns, st.st_size)
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is None:
            for stale in [k for k in _CACHE if k[0] == key[0]]:
                del _CACHE[stale]
            cached = _CACHE[key] = _parse(resolved)
        return cached


def _parse(path: Path) -> GGUFFile:
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _Parser(mm, path).parse()
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        mm.close()
        raise ValueError(f"model: {path} is not a valid GGUF file (truncated or corrupt header: {e})") from e
    except ValueError:
        mm.close()
        raise


class _Parser:
    def __init__(self, mm: mmap.mmap, path: Path) -> None:
        self.mm = mm
        self.path = path
        self.pos = 0

    def parse(self) -> GGUFFile:
        mm = self.mm
        if mm[:4] != GGUF_MAGIC:
            raise ValueError(f"model: {self.path} is not a GGUF file (bad magic {mm[:4]!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version not in _VERSIONS:
            raise ValueError(f"model: {self.path} is GGUF version {version}; only versions 2 and 3 are read")
        self.pos = 24
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = _U32.unpack_from(mm, self.pos)
            self.pos += 4
            if key in metadata:
                raise ValueError(f"model: {self.path} repeats metadata key {key!r}")
            metadata[key] = self._value(vtype)
        entries = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = _U32.unpack_from(mm, self.pos)
            dims = struct.unpack_from(f"<{n_dims}Q", mm, self.pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", mm, self.pos + 4 + 8 * n_dims)
            self.pos += 4 + 8 * n_dims + 12
            entries.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment % 8:
            raise ValueError(f"model: {self.path} has invalid general.alignment {alignment}")
        data_start = -(-self.pos // alignment) * alignment
        from gguf.constants import GGML_QUANT_SIZES

        tensors: dict[str, GGUFTensorInfo] = {}
        size = len(mm)
        for name, shape, ggml_type, offset in entries:
            if name in tensors:
                raise ValueError(f"model: {self.path} holds tensor {name!r} twice")
            try:
                block, type_size = GGML_QUANT_SIZES[_qtype(ggml_type)]
            except (ValueError, KeyError):
                raise ValueError(f"model: {self.path} tensor {name!r} has unknown ggml type {ggml_type}") from None
            n_bytes = prod(shape) * type_size // block
            start = data_start + offset
            if start + n_bytes > size:
                raise ValueError(f"model: {self.path} is truncated (tensor {name!r} ends past end of file)")
            tensors[name] = GGUFTensorInfo(name, shape, ggml_type, start, n_bytes)
        return GGUFFile(self.path, metadata, tensors, mm, version)

    def _string(self) -> str:
        mm, pos = self.mm, self.pos
        (n,) = _U64.unpack_from(mm, pos)
        self.pos = pos + 8 + n
        return mm[pos + 8:pos + 8 + n].decode("utf-8")

    def _value(self, vtype: int) -> Any:
        scalar = _SCALAR.get(vtype)
        if scalar is not None:
            (v,) = struct.unpack_from("<" + scalar[0], self.mm, self.pos)
            self.pos += scalar[1]
            return v
        if vtype == _T_STRING:
            return self._string()
        if vtype != _T_ARRAY:
            raise ValueError(f"model: {self.path} has metadata of unknown type {vtype}")
        etype, count = struct.unpack_from("<IQ", self.mm, self.pos)
        self.pos += 12
        scalar = _SCALAR.get(etype)
        if scalar is not None:
            values = list(struct.unpack_from(f"<{count}{scalar[0]}", self.mm, self.pos))
            self.pos += count * scalar[1]
            return values
        if etype == _T_STRING:
            return self._string_array(count)
        return [self._value(etype) for _ in range(count)]  # arrays of arrays: rare, and small

    def _string_array(self, count: int) -> list[str]:
        mm, pos = self.mm, self.pos
        unpack = _U64.unpack_from
        out = []
        append = out.append
        for _ in range(count):
            (n,) = unpack(mm, pos)
            pos += 8
            append(mm[pos:pos + n].decode("utf-8"))
            pos += n
        self.pos = pos
        return out
