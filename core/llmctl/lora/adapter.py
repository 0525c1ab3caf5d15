"""Reading a PEFT LoRA adapter and checking it against the base model, before any request uses it.

Every error is a ``ValueError`` that names the adapter and the field or tensor at fault, so a bad adapter fails its
own request (or the start-up) with the reason, and the engine keeps serving everything else.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmctl.lora.request import LoRARequest

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MAX_CONFIG_BYTES = 1 << 20
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class TargetShape:
    """A projection an adapter may target: its checkpoint name's input and output widths."""

    in_features: int
    out_features: int


@dataclass
class LoRAAdapter:
    """One adapter's weights on the host: checkpoint module prefix -> (A [r, in], B [out, r] with the scaling
    folded in), in the model's dtype. Requests hold a reference, so an unloaded adapter stays alive until they end."""

    request: LoRARequest
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def adapter_id(self) -> int:
        return self.request.lora_int_id

    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def _fail(req: LoRARequest, message: str) -> ValueError:
    return ValueError(f"lora adapter {req.lora_name!r} ({req.lora_path}): {message}")


def _read_config(req: LoRARequest, root: Path) -> dict:
    path = root / CONFIG_FILE
    if not root.is_dir():
        raise _fail(req, "lora_path: no such adapter directory")
    if not path.is_file():
        raise _fail(req, f"lora_path: {CONFIG_FILE} is missing")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise _fail(req, f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(req, f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise _fail(req, f"{CONFIG_FILE} must hold a JSON object")
    return config


def _read_tensors(req: LoRARequest, root: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        path = root / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path), device="cpu")
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickles code
        except Exception as exc:  # a corrupt file is the adapter's fault, not the server's
            raise _fail(req, f"{name} could not be read: {exc}") from None
        if not isinstance(loaded, dict):
            raise _fail(req, f"{name} does not hold a dict of tensors")
        return loaded
    raise _fail(req, f"lora_path: no adapter weights ({' or '.join(WEIGHT_FILES)})")


def _check_config(req: LoRARequest, config: Mapping, max_rank: int) -> tuple[int, float]:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _fail(req, f"peft_type {peft_type!r} is not supported; only LORA adapters are")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise _fail(req, f"r: must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise _fail(req, f"r: rank {rank} is above max_lora_rank {max_rank}")
    alpha = config.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise _fail(req, f"lora_alpha: must be a number, got {alpha!r}")
    for key, why in (("use_dora", "DoRA adapters are not supported"), ("rank_pattern", "per-module ranks are not "
                     "supported"), ("alpha_pattern", "per-module alphas are not supported")):
        if config.get(key):
            raise _fail(req, f"{key}: {why}")
    saved = config.get("modules_to_save")
    if saved:  # as in vLLM: a fully trained copy of a module would be a second base model per adapter
        names = ", ".join(map(str, saved)) if isinstance(saved, list) else repr(saved)
        raise _fail(req, f"modules_to_save: fully trained modules ({names}) are not supported; train them as LoRA "
                         "target_modules (embed_tokens and lm_head can be)")
    if config.get("bias", "none") != "none":
        raise _fail(req, f"bias: {config.get('bias')!r} is not supported; only 'none'")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scale)


def _module_of(key: str) -> tuple[str, str] | None:
    """``base_model.model.<module>.lora_A.weight`` -> (``<module>``, ``A``); embeddings use ``lora_embedding_A``."""
    name = key.removeprefix(_PEFT_PREFIX)
    for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "A"),
                         (".lora_embedding_B", "B")):
        if name.endswith(suffix):
            return name[: -len(suffix)], part
    if name.endswith((".lora_A.default.weight", ".lora_B.default.weight")):
        return _module_of(name.replace(".default.weight", ".weight"))
    return None


def load_adapter(req: LoRARequest, max_rank: int, targets: Mapping[str, TargetShape], embedding: str | None,
                 dtype: torch.dtype) -> LoRAAdapter:
    """Read ``req``'s adapter and check it against ``targets`` (checkpoint module prefix -> widths; ``embedding``
    names the token embedding among them, whose A is [r, vocab] and is kept transposed)."""
    root = Path(os.path.expanduser(req.lora_path))
    config = _read_config(req, root)
    rank, scale = _check_config(req, config, max_rank)
    tensors = _read_tensors(req, root)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.endswith(".base_layer.weight"):
            # peft saves the (frozen) base embedding beside an embedding adapter; only its shape can be checked
            module = key.removeprefix(_PEFT_PREFIX).removesuffix(".base_layer.weight")
            shape = targets.get(module)
            if shape is None or tuple(tensor.shape) not in ((shape.in_features, shape.out_features),
                                                            (shape.out_features, shape.in_features)):
                raise _fail(req, f"tensor {key}: a resized or replaced base layer is not supported")
            continue
        found = _module_of(key)
        if found is None:
            raise _fail(req, f"tensor {key} is not a LoRA A or B matrix")
        module, part = found
        parts.setdefault(module, {})[part] = tensor
    if not parts:
        raise _fail(req, "the adapter holds no LoRA weights")
    adapter = LoRAAdapter(req, rank)
    missing = sorted(m for m in parts if m not in targets)
    if missing:
        known = ", ".join(sorted({m.rsplit(".", 1)[-1] for m in targets}))
        raise _fail(req, f"target_modules: the model has no module {missing[0]} (LoRA can target: {known})")
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise _fail(req, f"{module}: needs both lora_A and lora_B, found only lora_{next(iter(ab))}")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise _fail(req, f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not have rank {rank}")
        shape = targets[module]
        if a.shape[1] != shape.in_features or b.shape[0] != shape.out_features:
            raise _fail(req, f"base model mismatch: {module} expects [{shape.out_features}, {shape.in_features}] "
                             f"but the adapter's B @ A is [{b.shape[0]}, {a.shape[1]}]")
        if module == embedding:
            a = a.t()  # [vocab, r]: a token's row is its shrunk one-hot input
        adapter.weights[module] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
    return adapter
