"""The engine's pooling side before and after the core: validate and tokenize a pooling prompt into a core
request, and turn the pooled tensor the core hands back into a ``PoolingRequestOutput``.

Every rejection is a ``ValueError`` naming the field and the limit, raised before anything is allocated (the
server turns it into a 400).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from llmctl.config import CacheConfig, ModelConfig
from llmctl.engine.input_processor import check_prompt_token_ids
from llmctl.engine.request import Request
from llmctl.pooling.outputs import PoolingOutput, PoolingRequestOutput
from llmctl.pooling.params import PoolingParams
from llmctl.sampling_params import SamplingParams

# A pooling request never samples; the core still reads a few sampling fields (prompt logprobs, seed), so every
# pooling request carries these neutral ones.
_NO_SAMPLING = SamplingParams(max_tokens=1)


@dataclass
class PreparedPooling:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: PoolingParams
    requests: list[Request]


def matryoshka_dimensions(hf_config: Any) -> tuple[bool, list[int] | None]:
    """Whether the checkpoint was trained for truncated embeddings (vLLM's ``is_matryoshka`` /
    ``matryoshka_dimensions`` config keys), and which sizes it lists, if any."""
    dims = getattr(hf_config, "matryoshka_dimensions", None)
    return bool(getattr(hf_config, "is_matryoshka", False) or dims), list(dims) if dims else None


class PoolingFrontend:
    def __init__(self, tokenizer: Any, model_config: ModelConfig, cache_config: CacheConfig, pooler: Any,
                 image_processor_dir: Any = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor_dir = image_processor_dir  # the checkpoint's, for models that embed images (CLIP)
        self._image_processor: Any = None
        self.model_config = model_config
        self.cache_config = cache_config
        self.tasks: tuple[str, ...] = tuple(pooler.tasks)
        self.default_task: str = pooler.default_task
        cfg = getattr(model_config.hf_config, "text_config", None) or model_config.hf_config
        self.hidden_size: int = cfg.hidden_size
        self.num_labels: int | None = getattr(pooler, "num_labels", None)
        self.is_matryoshka, self.matryoshka_dims = matryoshka_dimensions(cfg)
        self._prompts: dict[str, tuple[str | None, list[int]]] = {}

    # -- before the core -------------------------------------------------------------------------------------
    def resolve_params(self, params: PoolingParams | None) -> PoolingParams:
        params = params if params is not None else PoolingParams()
        if not isinstance(params, PoolingParams):
            raise ValueError(f"pooling_params: expected PoolingParams, got {type(params).__name__}")
        task = params.task or self.default_task
        if task not in self.tasks:
            raise ValueError(f"task: this model serves {', '.join(self.tasks)}, not {task!r}")
        if params.dimensions is not None:
            if task not in ("embed", "encode") or self.num_labels is not None:
                raise ValueError("dimensions: only embedding models take dimensions")
            if not self.is_matryoshka:
                raise ValueError("dimensions: this model was not trained for Matryoshka embeddings, so it does not "
                                 "support changing the output dimensions")
            if self.matryoshka_dims is not None and params.dimensions not in self.matryoshka_dims:
                raise ValueError(f"dimensions: must be one of {self.matryoshka_dims}, got {params.dimensions}")
            if params.dimensions > self.hidden_size:
                raise ValueError(f"dimensions: must be <= the model's {self.hidden_size}, got {params.dimensions}")
        t = params.truncate_prompt_tokens
        max_len = self.model_config.max_model_len
        if t is not None and t > max_len:
            raise ValueError(f"truncate_prompt_tokens: must be <= max_model_len ({max_len}), got {t}")
        return params if params.task == task else params.clone(task=task)

    def tokenize(self, prompt: Any, params: PoolingParams) -> tuple[str | None, list[int], list[int] | None]:
        """(text, token ids, segment ids). Text is truncated by the tokenizer (from the right, keeping the
        closing special token, as sentence-transformers does); given token ids keep their last tokens (vLLM)."""
        limit = params.truncate_prompt_tokens
        if limit == -1:
            limit = self.model_config.max_model_len
        types: list[int] | None = None
        if isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, dict):
            text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
            types = prompt.get("token_type_ids")
            if text is None and ids is None:
                raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(prompt, (list, tuple)):
            text, ids = None, list(prompt)
        else:
            raise ValueError(f"prompt: expected a string, token ids or a dict, got {type(prompt).__name__}")
        if ids is None:
            if not isinstance(text, str):
                raise ValueError(f"prompt: expected a string, got {type(text).__name__}")
            if not text:
                raise ValueError("prompt: must not be empty")
            kw = {"truncation": True, "max_length": limit} if limit is not None else {}
            ids = list(self.tokenizer(text, **kw)["input_ids"])
        else:
            if not isinstance(ids, (list, tuple)):
                raise ValueError(f"prompt_token_ids: expected a list of token ids, got {type(ids).__name__}")
            ids = list(ids)
            if limit is not None and len(ids) > limit:
                types = types[-limit:] if types else types
                ids = ids[-limit:]
        check_prompt_token_ids(ids, self.model_config.vocab_size)
        if types is not None and (len(types) != len(ids) or any(t not in (0, 1) for t in types)):
            raise ValueError("token_type_ids: must be 0 or 1 for each prompt token")
        return text, ids, types

    def check_length(self, n: int) -> None:
        max_len = self.model_config.max_model_len
        if n > max_len:
            raise ValueError(f"prompt: {n} tokens exceed this model's maximum input length of {max_len} tokens "
                             f"(max_model_len); shorten the input or set truncate_prompt_tokens")
        bs = self.cache_config.block_size
        need = -(-n // bs)
        if need > self.cache_config.num_blocks:
            raise ValueError(f"prompt: {n} tokens need {need} KV blocks but the cache holds "
                             f"{self.cache_config.num_blocks}; raise kv_cache_memory")

    def image_pixels(self, mm: Any) -> Any:
        """One image (PIL) -> [3, H, W] pixels by the checkpoint's own image processor (transformers')."""
        if not isinstance(mm, dict) or set(mm) - {"image"}:
            raise ValueError("multi_modal_data: expected {'image': PIL.Image.Image}")
        if self.image_processor_dir is None:
            raise ValueError("multi_modal_data: this model does not take images")
        image = mm.get("image")
        if isinstance(image, list):
            if len(image) != 1:
                raise ValueError(f"multi_modal_data: one image per embedding request, got {len(image)}")
            image = image[0]
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise ValueError(f"multi_modal_data.image: expected a PIL image, got {type(image).__name__}")
        if self._image_processor is None:
            from transformers import AutoImageProcessor

            self._image_processor = AutoImageProcessor.from_pretrained(str(self.image_processor_dir))
        return self._image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def prepare(self, request_id: str, prompt: Any, params: PoolingParams | None,
                arrival_time: float | None = None) -> PreparedPooling:
        params = self.resolve_params(params)
        pixels = None
        if isinstance(prompt, dict) and prompt.get("multi_modal_data") is not None:
            if prompt.get("prompt") or prompt.get("prompt_token_ids"):
                raise ValueError("multi_modal_data: an embedding request is an image or a text, not both")
            if params.task not in ("embed", "encode"):
                raise ValueError(f"multi_modal_data: images can only be embedded, not used for {params.task}")
            pixels = self.image_pixels(prompt["multi_modal_data"])
            text, ids, types = None, [0], None  # one placeholder token holds the image's place in the engine
        else:
            text, ids, types = self.tokenize(prompt, params)
        self.check_length(len(ids))
        req = Request(request_id=request_id, prompt_token_ids=ids, sampling_params=_NO_SAMPLING,
                      arrival_time=arrival_time or time.time(), max_tokens=1, pooling_params=params,
                      token_type_ids=types, pixel_values=pixels)
        return PreparedPooling(request_id, text, ids, params, [req])

    # -- the core's lifecycle ----------------------------------------------------------------------------------
    def add(self, prepared: PreparedPooling) -> None:
        self._prompts[prepared.request_id] = (prepared.prompt, prepared.prompt_token_ids)

    def has(self, request_id: str) -> bool:
        return request_id in self._prompts

    def abort(self, request_id: str) -> PoolingRequestOutput | None:
        entry = self._prompts.pop(request_id, None)
        if entry is None:
            return None
        return PoolingRequestOutput(request_id, PoolingOutput(_empty()), entry[1], finished=True, error="aborted",
                                    prompt=entry[0])

    def finish(self, request_id: str, pooled: Any, error: str | None) -> PoolingRequestOutput | None:
        entry = self._prompts.pop(request_id, None)
        if entry is None:
            return None
        data = pooled if pooled is not None else _empty()
        return PoolingRequestOutput(request_id, PoolingOutput(data), entry[1], finished=True, error=error,
                                    prompt=entry[0])


def _empty() -> Any:
    import torch

    return torch.empty(0)
