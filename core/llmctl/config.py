"""Engine arguments (what a user passes) and the resolved configuration the components run on.

``EngineArgs`` checks every user-facing value in one place and raises ``ValueError`` naming the field, before
a model is loaded or a KV block allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(value: str | torch.dtype) -> torch.dtype | None:
    """``None`` for "auto"; raises naming ``dtype`` for anything unknown."""
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise ValueError(f"dtype: {value} is not supported; use one of float32, bfloat16, float16, auto")
        return value
    if not isinstance(value, str):
        raise ValueError(f"dtype: expected a string, got {type(value).__name__}")
    if value.lower() == "auto":
        return None
    if value.lower() not in _DTYPES:
        raise ValueError(f"dtype: unknown dtype {value!r}; use one of auto, float32, bfloat16, float16")
    return _DTYPES[value.lower()]


USAGE_CONTEXTS = (None, "llm_class", "engine_context", "openai_api_server")


@dataclass
class EngineArgs:
    model: str
    tokenizer: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str | torch.dtype = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    # KV cache storage (vLLM's names): "auto" (the model dtype), "fp8" (= "fp8_e4m3"), "fp8_e5m2" or "int8"; the
    # 8-bit ones keep a scale per token and KV head beside the codes (llmctl.kv.cache_dtype).
    kv_cache_dtype: str = "auto"
    kv_cache_memory: int | float | None = None  # bytes, or a fraction of free memory; None = platform default
    # Share of the device the engine may fill (weights + activations + KV) where the platform sizes the KV cache
    # by profiling (GPUs); None = the platform's default. Ignored when kv_cache_memory is set.
    gpu_memory_utilization: float | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    # vLLM's name: a prompt chunk of one request never exceeds this many tokens in a step (0 = no cap), so a long
    # prefill, or a preempted request's recompute, is spread over several steps and the decodes sharing those
    # steps keep a short inter-token gap.
    long_prefill_token_threshold: int = 0
    # vLLM's name: the most requests with a prompt chunk in one step (0 = no cap; None = the platform's default,
    # which the CPU sets to 1 for an online engine, see the CPU platform's configure). Prompts that arrive
    # together then enter one step each, so their streams finish, and their successors arrive, spread over
    # steps instead of in waves that every new prompt queues behind.
    max_num_partial_prefills: int | None = None
    # Steps that carry only decodes after each step with a prompt chunk, while any request decodes (0 = none; None
    # = the platform's default, which the CPU sets to 1 for an online engine). Why: a step with a prompt costs
    # many decode steps on a CPU, and a request that arrives while one runs waits for it; under closed-loop load
    # the next stream's request arrives exactly then, so without a decode step between them every prompt queued
    # behind the one before it (TTFT about two prompt steps instead of one; docs/performance.md).
    min_decode_steps_between_prefills: int | None = None
    # vLLM's UsageContext, as a string: "llm_class" (the offline LLM), "engine_context" (an AsyncLLM built
    # directly), "openai_api_server" (llmctl serve); None = not said. Platforms may pick different defaults for
    # offline throughput and for online latency, as vLLM's do.
    usage_context: str | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    device: str | None = None
    generation_config: str = "auto"
    attention_backend: str | None = None
    enforce_eager: bool = False  # never replay captured decode graphs, even where the platform offers them
    max_logprobs: int = 20
    served_model_name: str | None = None
    # Settings only the selected platform reads (the CPU's ``num_threads``, say), by the names its
    # ``Platform.options`` declares; ``from_kwargs`` routes such keywords here, and the platform applies them in
    # ``configure``. Core never reads them.
    platform_options: dict[str, Any] = field(default_factory=dict)
    # Weight quantization (vLLM's names): None = the checkpoint's own (config.json quantization_config, or the
    # GGUF file's block types); int8 / fp8 quantize an unquantized checkpoint at load. See llmctl.quantization.
    quantization: str | None = None
    # Loading options (vLLM's names): which implementation runs the model, config overrides, where hub downloads go.
    model_impl: str = "auto"  # "auto" | "native" | "transformers"
    hf_overrides: dict[str, Any] | str | None = None  # a dict, or its JSON text
    download_dir: str | None = None
    # "generate", "pooling" (embeddings, classification, scores: llmctl.pooling) or "auto" (from the checkpoint)
    runner: str = "auto"
    pooler_config: Any = None  # {"pooling_type": "CLS"|"MEAN"|"LAST", "normalize": bool} over the checkpoint's
    structured_outputs_backend: str = "auto"  # grammar engine for structured output: auto | xgrammar | guidance
    # vLLM's other spellings of the same choice: the newer {"backend": ...} config and the older flag name
    structured_outputs_config: dict[str, Any] | str | None = None
    guided_decoding_backend: str | None = None
    structured_outputs_compile_timeout: float = 3.0  # seconds before a grammar compile is refused
    # vLLM's shape: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": .., "prompt_lookup_max":
    # ..}; a dict, its JSON text, or a parsed SpeculativeConfig (spec_decode/config.py)
    speculative_config: Any = None
    # Multi-LoRA (vLLM's names): adapters per request through LoRARequest; see llmctl.lora.
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # Parallelism (vLLM's names; docs/distributed.md): tensor_parallel_size ranks each hold a slice of every layer.
    # The executor starts them: "mp" (worker processes of this one, the default for more than one rank),
    # "ray" (Ray actors, on one machine or several), "external_launcher" (this process is one rank, started with
    # the others by torchrun or a job scheduler), "uni" (this process alone).
    tensor_parallel_size: int = 1
    # pipeline_parallel_size stages each hold a contiguous run of layers (each stage split over tensor_parallel_size
    # ranks when both are set: tensor_parallel.RankLayout)
    pipeline_parallel_size: int = 1
    # Mixture-of-experts layers place whole experts on the tensor-parallel ranks (num_experts / tp each) instead of
    # splitting every expert by its columns (llmctl.expert_parallel), over every replica's ranks with
    # data_parallel_size > 1 (num_experts / (dp * tp) each); ignored, with a log line, without experts
    enable_expert_parallel: bool = False
    # data_parallel_size replicas of the whole model, each its own engine core and worker processes, behind one
    # frontend that routes each request to one of them (llmctl.executor.data_parallel)
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    # Multimodal models (vLLM's name): the most items of each modality in one prompt, a dict or its JSON text,
    # e.g. {"image": 2}; None = one image (see llmctl.multimodal.processor).
    limit_mm_per_prompt: dict[str, int] | str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("model: a model path, hub repo id or .gguf file is required")
        parse_dtype(self.dtype)
        if self.max_model_len is not None and (isinstance(self.max_model_len, bool) or
                                               not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"max_model_len: must be a positive integer, got {self.max_model_len!r}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            raise ValueError(f"block_size: must be a power of two between 1 and 256, got {self.block_size!r}")
        from llmctl.kv.cache_dtype import normalize_kv_cache_dtype

        self.kv_cache_dtype = normalize_kv_cache_dtype(self.kv_cache_dtype)
        kv = self.kv_cache_memory
        if kv is not None:
            if isinstance(kv, bool) or not isinstance(kv, (int, float)) or (isinstance(kv, float) and math.isnan(kv)):
                raise ValueError(f"kv_cache_memory: must be bytes (int) or a fraction (float), got {kv!r}")
            if isinstance(kv, float) and not 0.0 < kv <= 1.0:
                raise ValueError(f"kv_cache_memory: a fraction must be in (0, 1], got {kv}")
            if isinstance(kv, int) and kv <= 0:
                raise ValueError(f"kv_cache_memory: must be > 0 bytes, got {kv}")
        util = self.gpu_memory_utilization
        if util is not None and (isinstance(util, bool) or not isinstance(util, (int, float)) or
                                 not 0.0 < util <= 1.0):
            raise ValueError(f"gpu_memory_utilization: must be a fraction in (0, 1], got {util!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager: must be True or False, got {self.enforce_eager!r}")
        if isinstance(self.max_num_seqs, bool) or not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs!r}")
        mnbt = self.max_num_batched_tokens
        if mnbt is not None and (isinstance(mnbt, bool) or not isinstance(mnbt, int) or mnbt < self.block_size):
            raise ValueError(f"max_num_batched_tokens: must be an integer >= block_size ({self.block_size}), "
                             f"got {mnbt!r}")
        lpt = self.long_prefill_token_threshold
        if isinstance(lpt, bool) or not isinstance(lpt, int) or lpt < 0:
            raise ValueError(f"long_prefill_token_threshold: must be an integer >= 0 (0 = no cap), got {lpt!r}")
        mpp = self.max_num_partial_prefills
        if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, int) or mpp < 0):
            raise ValueError(f"max_num_partial_prefills: must be an integer >= 0 (0 = no cap), got {mpp!r}")
        gap = self.min_decode_steps_between_prefills
        if gap is not None and (isinstance(gap, bool) or not isinstance(gap, int) or gap < 0):
            raise ValueError(f"min_decode_steps_between_prefills: must be an integer >= 0 (0 = none), got {gap!r}")
        if self.usage_context not in USAGE_CONTEXTS:
            raise ValueError(f"usage_context: must be one of {', '.join(map(str, USAGE_CONTEXTS))}, "
                             f"got {self.usage_context!r}")
        if self.generation_config not in ("auto", "none", "vllm"):
            raise ValueError(f"generation_config: must be 'auto' or 'none', got {self.generation_config!r}")
        from llmctl.quantization import normalize_method

        self.quantization = normalize_method(self.quantization)
        if self.runner not in ("auto", "generate", "pooling"):
            raise ValueError(f"runner: must be one of auto, generate, pooling, got {self.runner!r}")
        self.lora_config()
        if not isinstance(self.seed, int):
            raise ValueError(f"seed: must be an integer, got {self.seed!r}")
        from llmctl.structured_output.backend import resolve_backend_options

        self.structured_outputs_backend = resolve_backend_options(self)
        timeout = self.structured_outputs_compile_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 600:
            raise ValueError(f"structured_outputs_compile_timeout: must be in (0, 600] seconds, got {timeout!r}")
        if not isinstance(self.platform_options, dict) or not all(isinstance(k, str) for k in self.platform_options):
            raise ValueError(f"platform_options: must be a dict of option names, got {self.platform_options!r}")
        self._validate_loading()
        if self.limit_mm_per_prompt is not None:
            from llmctl.multimodal.processor import parse_limit_mm_per_prompt

            self.limit_mm_per_prompt = parse_limit_mm_per_prompt(self.limit_mm_per_prompt)
        from llmctl.spec_decode.config import SpeculativeConfig

        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        self._validate_parallel()

    def _validate_parallel(self) -> None:
        from llmctl.tensor_parallel import EXECUTOR_BACKENDS

        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor_parallel_size: must be an integer >= 1, got {tp!r}")
        if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
            raise ValueError(f"pipeline_parallel_size: must be an integer >= 1, got {pp!r}")
        if not isinstance(self.enable_expert_parallel, bool):
            raise ValueError(f"enable_expert_parallel: must be true or false, got {self.enable_expert_parallel!r}")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend: must be one of {', '.join(EXECUTOR_BACKENDS)}, "
                             f"got {backend!r}")
        self._validate_data_parallel()
        world, what = (tp, "tensor_parallel_size") if pp == 1 else (pp, "pipeline_parallel_size")
        if backend == "uni" and world > 1:
            raise ValueError(f"distributed_executor_backend: 'uni' runs one process and cannot hold "
                             f"{what}={world} ranks; use 'mp' or 'external_launcher'")
        if world == 1:
            return
        refused = [("speculative_config", self.speculative_config is not None),
                   ("runner", self.runner == "pooling"),
                   ("enable_lora", self.enable_lora and pp > 1)]  # LoRA shards with tensor parallelism only
        for name, used in refused:
            if used:
                raise ValueError(f"{name}: not supported with {what} > 1 yet (got {what}={world}); run it with "
                                 f"{what}=1")

    def _validate_data_parallel(self) -> None:
        dp = self.data_parallel_size
        if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
            raise ValueError(f"data_parallel_size: must be an integer >= 1, got {dp!r}")
        if dp == 1:
            return
        if self.distributed_executor_backend not in (None, "mp"):
            raise ValueError(f"data_parallel_size: replicas run as worker processes (the mp executor), not with "
                             f"distributed_executor_backend={self.distributed_executor_backend!r}")
        for name, used in (("enable_lora", self.enable_lora), ("runner", self.runner == "pooling")):
            if used:
                raise ValueError(f"{name}: not supported with data_parallel_size > 1 yet (got "
                                 f"data_parallel_size={dp})")

    @property
    def world_size(self) -> int:
        """Ranks of one model replica: tensor-parallel ranks times pipeline stages."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def executor_backend(self) -> str:
        """The executor actually used: one process for a single rank, ``mp`` unless another was chosen."""
        if self.distributed_executor_backend == "external_launcher":
            return "external_launcher"
        if self.world_size == 1 and self.distributed_executor_backend != "ray":
            return "uni"
        return self.distributed_executor_backend or "mp"

    def _validate_loading(self) -> None:
        if self.model_impl not in ("auto", "native", "transformers"):
            raise ValueError(f"model_impl: must be auto, native or transformers, got {self.model_impl!r}")
        if isinstance(self.hf_overrides, str):
            import json

            try:
                self.hf_overrides = json.loads(self.hf_overrides)
            except json.JSONDecodeError as exc:
                raise ValueError(f"hf_overrides: not valid JSON ({exc.msg} at character {exc.pos})") from None
        if self.hf_overrides is not None and not isinstance(self.hf_overrides, dict):
            raise ValueError(f"hf_overrides: must be a JSON object (config field -> value), got "
                             f"{type(self.hf_overrides).__name__}")
        if not isinstance(self.trust_remote_code, bool):
            raise ValueError(f"trust_remote_code: must be True or False, got {self.trust_remote_code!r}")

    def lora_config(self) -> Any:
        """The checked LoRA limits, or None when LoRA is off."""
        if not isinstance(self.enable_lora, bool):
            raise ValueError(f"enable_lora: must be True or False, got {self.enable_lora!r}")
        if not self.enable_lora:
            return None
        from llmctl.lora.config import LoRAConfig

        return LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineArgs:
        """Engine arguments from keywords (``LLM(model, **kwargs)``). A keyword that is no field here but an
        option some installed platform declares (``num_threads`` for the CPU) goes to ``platform_options``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            from llmctl.plugins import get_plugin_manager

            platform_options = get_plugin_manager().registry.platform_options()
            for name in unknown:
                if name not in platform_options:
                    raise ValueError(f"{name}: unknown engine argument; known: "
                                     f"{', '.join(sorted(known | set(platform_options)))}")
            options = dict(kwargs.pop("platform_options", None) or {})
            options.update({name: kwargs.pop(name) for name in unknown})
            kwargs["platform_options"] = options
        return cls(model=model, **kwargs)


@dataclass
class ModelConfig:
    model: str
    served_model_name: str
    hf_config: Any
    dtype: torch.dtype
    max_model_len: int
    vocab_size: int
    generation_config: dict[str, Any] | None
    eos_token_ids: tuple[int, ...]
    # The most tokens one request may generate, when the model bounds it below max_model_len (an encoder-decoder's
    # decoder positions); None: only max_model_len bounds it.
    max_new_tokens: int | None = None


@dataclass
class CacheConfig:
    block_size: int
    num_blocks: int
    enable_prefix_caching: bool
    bytes_per_block: int
    cache_dtype: torch.dtype | None = None  # the KV cache tensors' dtype (an 8-bit one with kv_cache_dtype)


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    max_loras: int | None = None  # the most distinct LoRA adapters in one step (None: LoRA off)
    long_prefill_token_threshold: int = 0  # most prompt tokens of one request in one step (0: no cap)
    max_num_partial_prefills: int = 0  # most requests with a prompt chunk in one step (0: no cap)
    min_decode_steps_between_prefills: int = 0  # decode-only steps after a step with a prompt chunk (0: none)
