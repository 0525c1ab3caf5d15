"""The engine core: one loop of schedule -> run model -> sample -> update, with no tokenizer and no I/O.

It runs in-process for the offline ``LLM`` and on its own thread for ``AsyncLLM``; nothing in it knows about
HTTP or text. Per-request failures are isolated here: when a batched step raises, each request of the batch is
retried alone and only the ones that still fail are ended with an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from llmctl.attention import build_attention_metadata
from llmctl.config import CacheConfig, EngineArgs, ModelConfig, SchedulerConfig
from llmctl.engine.encoder_decoder import check_engine as check_encoder_decoder
from llmctl.engine.fault_injection import FAULT_INJECTION_ENV, InjectedFault  # noqa: F401  (re-exported)
from llmctl.engine.fault_injection import install_if_enabled as install_fault_injection_if_enabled
from llmctl.engine.malloc_tuning import keep_heap_headroom
from llmctl.engine.model_runner import ModelRunner, decode_graph_batch_sizes
from llmctl.engine.request import Request, RequestStatus
from llmctl.engine.sampler import RowLogprobs, Sampler, prompt_logprobs_in_slices
from llmctl.engine.scheduler import Scheduler, SchedulerOutput
from llmctl.engine.step_stats import IterationTokenStats
from llmctl.kv.cache_dtype import kv_dtype_name, kv_feature, kv_row_width, kv_storage_dtype
from llmctl.kv.manager import KVCacheManager
from llmctl.models.base import KVCacheSpec, ModelContext
from llmctl.plugins import get_plugin_manager
from llmctl.plugins.types import AttentionBackend, DecodeStepRunner, Platform
from llmctl.spec_decode.config import SpeculativeConfig
from llmctl.spec_decode.draft_proposer import load_draft_proposer, resolve_draft_model
from llmctl.spec_decode.eagle import load_eagle_proposer, resolve_eagle_head
from llmctl.spec_decode.eagle3 import load_eagle3_proposer, resolve_eagle3_head
from llmctl.spec_decode.rejection_sampler import RejectionSampler
from llmctl.spec_decode.speculator import Speculator
from llmctl.structured_output.request_grammar import apply_token_bitmask, fill_draft_bitmask, fill_grammar_bitmask
from llmctl.tensor_parallel import (
    PipelineStage,
    RankAddress,
    TensorParallelGroup,
    agree_min,
    check_pipeline_splittable,
    check_same_model,
    check_splittable,
    init_group,
    launcher_address,
)

logger = logging.getLogger(__name__)

DEFAULT_KV_FRACTION = 0.25
DEFAULT_KV_CAP_BYTES = 4 << 30


@dataclass
class CoreOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[RowLogprobs] | None = None
    prompt_logprobs: list[RowLogprobs] | None = None
    prompt_logprobs_start: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    pooled: torch.Tensor | None = None  # a pooling request's result (it finishes in the step that computes it)
    first_scheduled_time: float | None = None  # wall clock when the scheduler first admitted the request


class EngineCore:
    def __init__(self, args: EngineArgs, rank: RankAddress | None = None) -> None:
        """``rank``: this process's place in a tensor-parallel group, as the ``mp`` executor's workers pass it;
        with ``external_launcher`` it comes from the launcher's environment, and without parallelism it is
        rank 0 of 1."""
        from llmctl.loader.model_loader import get_model_class, load_model, resolve_dtype
        from llmctl.loader.source import resolve_model
        from llmctl.pooling.setup import backend_features, plan_runner

        self.args = args
        spec_config = SpeculativeConfig.parse(args.speculative_config)
        if spec_config is not None and spec_config.method in ("eagle", "eagle3") and args.enable_lora:
            # the EAGLE head embeds its drafts through the target's embedding, whose adapters map the step's tokens
            raise ValueError(f"speculative_config: method {spec_config.method!r} is not supported with enable_lora "
                             "yet; use 'ngram' or 'draft_model'")
        keep_heap_headroom()  # before the first step's temporaries: see malloc_tuning
        plugins = get_plugin_manager()
        self.platform: Platform = plugins.select_platform(args.device)
        user_mnbt = args.max_num_batched_tokens  # before the platform fills it in (pooling checks the user's)
        self._apply_platform_config(args)
        self.source = resolve_model(args.model, args.revision, args.trust_remote_code, args.download_dir,
                                    args.hf_overrides)
        hf_config = self.source.hf_config
        self.runner_plan = plan_runner(args.runner, args.pooler_config, hf_config, self.source.local_dir,
                                       plugins.registry,
                                       lambda cfg, reg: get_model_class(cfg, reg, args.model_impl))
        self.runner_type = self.runner_plan.runner
        from llmctl.quantization import resolve_quant_config

        quant = resolve_quant_config(args.quantization, self.source)
        check_tensor_parallel(args, hf_config, self.runner_plan.model_cls, quant)  # before waiting for peers
        address = rank or (launcher_address(args.world_size)
                           if args.executor_backend == "external_launcher" else RankAddress(0, 1, ""))
        if address.world_size != args.world_size:
            raise ValueError(f"tensor_parallel_size: {args.tensor_parallel_size} x pipeline_parallel_size "
                             f"{args.pipeline_parallel_size} ranks, but this process was started as rank "
                             f"{address.rank} of {address.world_size}")
        # Every rank of the replica in one group; it is the tensor-parallel group or the pipeline's, never both
        # (EngineArgs refuses the combination).
        self.world: TensorParallelGroup = init_group(
            address, plugins.registry.communicator_for(self.platform.name), self.platform.name)
        pp = args.pipeline_parallel_size > 1
        self.tp = TensorParallelGroup() if pp else self.world
        self.pp = PipelineStage(self.world.rank, self.world.size, self.world.communicator) if pp else \
            PipelineStage()
        self.device = self.platform.torch_device(address.local_rank) if self.world.size > 1 else \
            self.platform.torch_device()
        dtype = resolve_dtype(args.dtype, hf_config, self.platform.supported_dtypes(),
                              quantized_checkpoint=self.source.gguf_file is not None)
        check_same_model(self.world, _rank_fingerprint(args, hf_config, dtype))
        self.model_config = self._model_config(hf_config, dtype)
        if getattr(self.runner_plan.model_cls, "supports_multimodal", False) and spec_config is not None \
                and spec_config.method != "ngram":
            raise ValueError(f"speculative_config: method {spec_config.method!r} proposes from token ids alone and "
                             f"would never see a request's images; use method 'ngram' with a multimodal model")
        draft_source = eagle_source = eagle3_source = None
        if spec_config is not None and spec_config.method == "draft_model":
            draft_source = resolve_draft_model(spec_config, self.model_config, args.trust_remote_code)
        elif spec_config is not None and spec_config.method == "eagle":
            eagle_source = resolve_eagle_head(spec_config, self.model_config, args.trust_remote_code)
        elif spec_config is not None and spec_config.method == "eagle3":
            eagle3_source = resolve_eagle3_head(spec_config, self.model_config, args.trust_remote_code)

        head_size, num_kv_heads, sliding_window = _kv_geometry(hf_config)
        self.kv_cache_dtype = kv_storage_dtype(args.kv_cache_dtype, dtype)
        kv_features = {kv_feature(self.kv_cache_dtype)} - {None}  # an 8-bit cache is a feature backends opt into
        features = frozenset({"chunked_prefill", "prefix_caching"} | kv_features |
                             ({"sliding_window"} if sliding_window else set()))
        model_cls = self.runner_plan.model_cls
        if callable(getattr(model_cls, "attention_head_size", None)):
            head_size = model_cls.attention_head_size(hf_config)  # MLA caches a latent, not head_dim
        # the model's own (soft-cap, ALiBi, bidirectional, ...): only backends that take them are chosen
        features = backend_features(features, self.runner_plan)
        self.attention: AttentionBackend = plugins.select_attention_backend(
            self.platform, dtype, head_size, args.block_size, features, name=args.attention_backend)
        self.ops = plugins.registry.resolve_ops(self.platform.name)
        ctx = ModelContext(ops=self.ops, attention=self.attention, dtype=dtype, device=self.device, quant=quant,
                           extra={"trust_remote_code": args.trust_remote_code,
                                  "pooler_config": self.runner_plan.pooler_config}, tp=self.tp, pp=self.pp)
        self.lora = None
        lora_config = args.lora_config()
        if lora_config is not None and self.runner_plan.pooling:
            raise ValueError("enable_lora: LoRA adapters apply to generating models only, not runner='pooling'")

        def attach_lora(model: torch.nn.Module) -> None:
            from llmctl.lora.manager import LoRAManager

            self.lora = LoRAManager(model, lora_config, self.ops, dtype, self.device)

        self.model = load_model(self.source, ctx, plugins.registry, self.platform.name, args.model_impl,
                                model_cls=self.runner_plan.model_cls,
                                before_bind=attach_lora if lora_config is not None else None)
        read_processor_config = getattr(self.model, "read_processor_config", None)
        if read_processor_config is not None:  # an image's token count follows its processor's resize bounds
            read_processor_config(self.source.local_dir)
        summary = getattr(self.model, "quant_summary", None)
        self.model_impl = "transformers" if type(self.model).__name__ == "TransformersForCausalLM" else "native"
        logger.info("llmctl model: %s runs on the %s implementation (%s; model_impl=%s)",
                    "/".join(getattr(hf_config, "architectures", None) or [str(hf_config.model_type)]),
                    self.model_impl, type(self.model).__name__, args.model_impl)
        spec = self.model.kv_cache_spec()

        mnbt = args.max_num_batched_tokens or max(2048, min(self.model_config.max_model_len, 8192))
        if self.runner_plan.pooling:  # every pooling prompt is computed whole, in one step
            if user_mnbt is None:
                mnbt = max(mnbt, self.model_config.max_model_len)
            elif mnbt < self.model_config.max_model_len:
                raise ValueError(f"max_num_batched_tokens: a pooling model computes each prompt in one step, so it "
                                 f"must be >= max_model_len ({self.model_config.max_model_len}), got {mnbt}")
        self.scheduler_config = SchedulerConfig(args.max_num_seqs, mnbt, self.model_config.max_model_len,
                                                max_loras=lora_config.max_loras if lora_config else None)
        check_encoder_decoder(self.model, args, mnbt)
        self.cache_config = self._cache_config(spec, dtype)
        shape = self.attention.kv_cache_shape(self.cache_config.num_blocks, args.block_size, spec.num_kv_heads,
                                              kv_row_width(spec.head_size, self.kv_cache_dtype))
        # torch.empty: pages are committed only when written, and backends never read a slot before writing it
        # (the testkit poisons unused slots to hold them to that).
        kv_caches = [torch.empty(shape, dtype=self.kv_cache_dtype, device=self.device)
                     for _ in range(spec.num_layers)]
        self.platform.prepare_kv_cache(kv_caches, self.cache_config.num_blocks)
        self.kv = KVCacheManager(self.cache_config.num_blocks, args.block_size,
                                 args.enable_prefix_caching and not self.runner_plan.pooling)
        self.scheduler = Scheduler(self.scheduler_config, self.kv)
        draft = load_draft_proposer(draft_source, self) if draft_source is not None else \
            load_eagle_proposer(eagle_source, self) if eagle_source is not None else \
            load_eagle3_proposer(eagle3_source, self) if eagle3_source is not None else None
        self.speculator = Speculator(spec_config, self.model_config.max_model_len, draft) if spec_config else None
        self.runner = ModelRunner(self.model, kv_caches, args.block_size, self.device, lora=self.lora)
        self.runner.keep_hidden = self.speculator is not None and self.speculator.wants_hidden
        self.runner.keep_aux_hidden = eagle3_source is not None
        decode_graphs = self._init_decode_graphs()
        self.sampler = Sampler(self.ops, args.seed)
        self.rejection_sampler = RejectionSampler(self.sampler)
        install_fault_injection_if_enabled(self)  # a test seam; without its variable the step carries no check
        self._bitmask_pool: ThreadPoolExecutor | None = None
        self.num_steps = 0
        self.iteration_tokens = IterationTokenStats()
        logger.info("llmctl engine: platform=%s attention=%s dtype=%s kv_cache_dtype=%s kv_blocks=%d (block_size=%d) "
                    "max_model_len=%d decode_graphs=%s quantization=%s", self.platform.name, self.attention.name, dtype,
                    kv_dtype_name(self.kv_cache_dtype), self.cache_config.num_blocks, args.block_size,
                    self.model_config.max_model_len, decode_graphs,
                    summary.describe() if summary is not None else "none")

    # -- configuration ---------------------------------------------------------------------------------------
    def _apply_platform_config(self, args: EngineArgs) -> None:
        """Apply what the platform asks for, but never over a value the user set explicitly."""
        for option in args.platform_options:
            if option not in self.platform.options:
                logger.warning("%s applies to platform(s) %s, not %s; ignored", option,
                               ", ".join(get_plugin_manager().registry.platform_options().get(option, ["none"])),
                               self.platform.name)
        for key, value in (self.platform.configure(args) or {}).items():
            if not hasattr(args, key):
                logger.warning("platform %s asked to set unknown engine argument %s; ignored", self.platform.name, key)
            elif getattr(args, key) is None:
                setattr(args, key, value)
                logger.info("platform %s set %s=%r", self.platform.name, key, value)

    def _model_config(self, hf_config, dtype: torch.dtype) -> ModelConfig:
        args = self.args
        text_cfg = getattr(hf_config, "text_config", None) or hf_config
        limit = getattr(text_cfg, "max_position_embeddings", None) or 2048
        if self.runner_plan.max_len_cap is not None:
            limit = min(limit, self.runner_plan.max_len_cap)
        context_len = getattr(self.runner_plan.model_cls, "engine_context_len", None)
        max_new_tokens = None
        if callable(context_len):  # an encoder-decoder's prompt holds its encoder input, then the decoder's tokens
            limit = context_len(hf_config, args.block_size)
            max_new_tokens = self.runner_plan.model_cls.max_decoder_len(hf_config)
        if args.max_model_len is not None and args.max_model_len > limit:
            raise ValueError(f"max_model_len: {args.max_model_len} exceeds the model's maximum context of {limit}")
        max_len = args.max_model_len or limit
        gen = self.source.generation_config if args.generation_config == "auto" else None
        eos: list[int] = []
        for src in ((gen or {}).get("eos_token_id"), getattr(text_cfg, "eos_token_id", None)):
            if isinstance(src, int):
                eos.append(src)
            elif isinstance(src, (list, tuple)):
                eos.extend(int(x) for x in src)
        return ModelConfig(
            model=args.model,
            served_model_name=args.served_model_name or args.model,
            hf_config=hf_config,
            dtype=dtype,
            max_model_len=max_len,
            vocab_size=text_cfg.vocab_size,
            generation_config=gen,
            eos_token_ids=tuple(dict.fromkeys(eos)),
            max_new_tokens=max_new_tokens,
        )

    def _cache_config(self, spec: KVCacheSpec, dtype: torch.dtype) -> CacheConfig:
        """Blocks for the KV cache: the user's ``kv_cache_memory`` when set, else what the platform measures by
        profiling, else a share of ``memory_info``'s free memory (capped, since host memory is shared)."""
        args = self.args
        cache_dtype = self.kv_cache_dtype
        elem = torch.tensor([], dtype=cache_dtype).element_size()
        # an 8-bit cache's rows carry their scales, which the budget counts like the codes
        row = kv_row_width(spec.head_size, cache_dtype)
        bytes_per_block = 2 * spec.num_layers * args.block_size * spec.num_kv_heads * row * elem
        max_len = self.model_config.max_model_len
        blocks_per_seq = -(-max_len // args.block_size)
        kv = args.kv_cache_memory
        profiled = self._profiled_kv_bytes(spec, dtype, bytes_per_block) if kv is None else None
        if profiled is not None:
            budget, source = profiled, "profiling"
        elif kv is None:
            budget, source = min(int(self._free_memory() * DEFAULT_KV_FRACTION), DEFAULT_KV_CAP_BYTES), "memory_info"
        elif isinstance(kv, float):
            budget, source = int(self._free_memory() * kv), "kv_cache_memory"
        else:
            budget, source = int(kv), "kv_cache_memory"
        if args.gpu_memory_utilization is not None and source != "profiling":
            logger.warning("gpu_memory_utilization=%s has no effect: %s", args.gpu_memory_utilization,
                           "kv_cache_memory is set" if kv is not None else
                           f"platform {self.platform.name} does not size the KV cache by profiling")
        num_blocks = budget // bytes_per_block
        if source == "profiling" and num_blocks < blocks_per_seq:
            util = args.gpu_memory_utilization
            raise ValueError(
                f"gpu_memory_utilization: after the weights and a profiled step of "
                f"{self.scheduler_config.max_num_batched_tokens} tokens, {budget} bytes are left for the KV cache "
                f"(gpu_memory_utilization={util if util is not None else 'platform default'}), fewer than one "
                f"sequence of max_model_len={max_len} needs ({blocks_per_seq * bytes_per_block} bytes); raise "
                f"gpu_memory_utilization, lower max_model_len or max_num_batched_tokens, or set kv_cache_memory")
        # Never more than every sequence at full length could use: memory beyond that is dead weight.
        useful = args.max_num_seqs * blocks_per_seq + 1
        if args.kv_cache_memory is None:
            num_blocks = min(num_blocks, useful)
        # Every rank schedules the same requests, so all must have as many blocks as the one with the fewest.
        num_blocks = agree_min(self.world, int(num_blocks))
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory: {budget} bytes is less than one KV block ({bytes_per_block} bytes)")
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB, from %s); max concurrency %.2fx requests "
                    "of max_model_len=%d", num_blocks, args.block_size, num_blocks * bytes_per_block / 2**30,
                    source, num_blocks / blocks_per_seq, max_len)
        return CacheConfig(args.block_size, int(num_blocks), args.enable_prefix_caching, bytes_per_block,
                           cache_dtype)

    def _free_memory(self) -> int:
        try:
            return self.platform.memory_info()[0]
        except NotImplementedError:
            return DEFAULT_KV_CAP_BYTES

    def _profiled_kv_bytes(self, spec: KVCacheSpec, dtype: torch.dtype, bytes_per_block: int) -> int | None:
        run_forward = self._profile_step(spec, dtype)
        kv_bytes = self.platform.profile_kv_cache_bytes(
            run_forward, gpu_memory_utilization=self.args.gpu_memory_utilization, bytes_per_block=bytes_per_block,
            block_size=self.args.block_size, max_model_len=self.model_config.max_model_len,
            device_index=self.device.index or 0)
        return None if kv_bytes is None else int(kv_bytes)

    def _profile_step(self, spec: KVCacheSpec, dtype: torch.dtype) -> Callable[[], None]:
        """The largest step the scheduler can form, for a platform to measure peak activation memory on.

        ``max_num_batched_tokens`` tokens (no more than ``max_num_seqs`` sequences can hold) in sequences of
        ``max_model_len`` and one remainder, since attention's scratch grows with the longest sequence; logits
        for as many rows as can sample in one step. The KV cache is a zeroed single block per layer that every
        block table points at, with no slot written: reads cost what they would in a real step, the memory
        stays negligible, and it is freed when the call returns.
        """
        sched = self.scheduler_config
        max_len, block_size = sched.max_model_len, self.args.block_size
        total = min(sched.max_num_batched_tokens, sched.max_num_seqs * max_len)
        full, rest = divmod(total, max_len)
        lens = [max_len] * full + ([rest] if rest else [])
        sample_rows = min(sched.max_num_seqs, total)
        dev = self.device

        @torch.inference_mode()
        def run_forward() -> None:
            shape = self.attention.kv_cache_shape(1, block_size, spec.num_kv_heads,
                                                  kv_row_width(spec.head_size, self.kv_cache_dtype))
            caches = [torch.zeros(shape, dtype=self.kv_cache_dtype, device=dev) for _ in range(spec.num_layers)]
            metadata = build_attention_metadata(
                list(lens), list(lens), torch.zeros((len(lens), -(-max(lens) // block_size)), dtype=torch.int32),
                torch.full((total,), -1, dtype=torch.int64), block_size, dev)
            positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lens]).to(dev)
            input_ids = torch.zeros(total, dtype=torch.int64, device=dev)
            extra = {}
            if getattr(self.model, "supports_multimodal", False):
                extra["inputs_embeds"] = self._profile_image_embeddings(input_ids, len(lens))
            hidden = self.model(input_ids, positions, caches, metadata, **extra)
            if not self.runner_plan.pooling:
                self.model.compute_logits(hidden[:sample_rows]).float()  # the sampler's float32 copy counts too
            del hidden, caches, metadata

        return run_forward

    def _profile_image_embeddings(self, input_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
        """A step filled with the most worst-case images it can touch (each sequence may start inside one and
        end inside another), encoded in one call as the runner would, their rows merged over the embeddings:
        the vision tower's activations and the encoder outputs count in the profiled peak."""
        model = self.model
        _, per_image = model.largest_image()
        total = input_ids.shape[0]
        from llmctl.multimodal.processor import parse_limit_mm_per_prompt

        limit = parse_limit_mm_per_prompt(self.args.limit_mm_per_prompt)["image"]
        count = max(1, min(-(-total // per_image) + num_seqs, limit * num_seqs))
        rows = model.embed_multimodal(model.dummy_features(count))
        embeds = model.embed_input_ids(input_ids)
        flat = torch.cat(rows)[:total]
        embeds[:flat.shape[0]] = flat.to(embeds.dtype)
        return embeds

    def _init_decode_graphs(self) -> str:
        """Ask the platform for a decode-step runner and capture it now that the KV cache exists; the returned
        words go into the start-up log so a user sees why steps run eagerly."""
        if self.args.enforce_eager:
            return "off (enforce_eager)"
        if self.runner_plan.pooling:
            return "off (pooling runner: prefill only)"
        if getattr(self.model, "is_encoder_decoder", False):
            return "off (encoder-decoder: cross-attention lengths vary per step)"
        if self.world.size > 1:
            return "off (tensor/pipeline parallel: the step's collectives run eagerly)"
        if self.lora is not None:
            return "off (LoRA: adapters switch per step)"
        if self.runner.keep_aux_hidden:
            return "off (eagle3: the head reads intermediate hidden states a captured step does not return)"
        if not getattr(self.attention, "supports_graph_capture", False):
            return f"off (attention backend {self.attention.name} cannot be captured)"
        sizes = decode_graph_batch_sizes(self.args.max_num_seqs)
        spec = self.runner.decode_graph_spec(sizes, self.model_config.max_model_len)
        runner = self.platform.decode_step_runner(spec)
        if runner is None:
            return f"off (platform {self.platform.name} has none)"
        if not isinstance(runner, DecodeStepRunner):
            raise TypeError(f"platform {self.platform.name}: decode_step_runner returned {type(runner).__name__}, "
                            f"which lacks capture/padded_size/run")
        try:
            with torch.inference_mode():
                runner.capture()
        except Exception as exc:
            raise RuntimeError(f"enforce_eager: capturing decode graphs failed ({type(exc).__name__}: {exc}); start "
                               f"with enforce_eager=True (llmctl serve --enforce-eager) to run without them") from exc
        captured = sorted({p for p in map(runner.padded_size, sizes) if p is not None})
        if not captured:
            why = getattr(runner, "reason", None)  # optional: a runner may say why it captured nothing
            return f"off (platform {self.platform.name} captured no batch size{': ' + why if why else ''})"
        self.runner.decode_runner = runner
        return f"on (batch sizes {captured[0]}..{captured[-1]}, larger decode batches eager)"

    def shutdown(self) -> None:
        """Release the parallel group (the process group's sockets); the engine cannot step afterwards."""
        self.world.destroy()

    # -- requests --------------------------------------------------------------------------------------------
    def max_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.args.block_size)

    def add_request(self, request: Request) -> None:
        self.scheduler.add(request)

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.scheduler.abort(rid)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_stats(self) -> dict[str, Any]:
        stats = self.kv.stats
        return {
            "kv_blocks_total": self.kv.pool.num_blocks,
            "kv_blocks_free": self.kv.num_free_blocks,
            "kv_cache_usage": self.kv.pool.usage(),
            "prefix_cache_queried_tokens": stats.queried_tokens,
            "prefix_cache_hit_tokens": stats.hit_tokens,
            "prefix_cache_hit_rate": stats.hit_tokens / stats.queried_tokens if stats.queried_tokens else 0.0,
            "num_steps": self.num_steps,
            **self.iteration_tokens.snapshot(),
            **self.scheduler.stats(),
            **(self.speculator.stats.as_dict() if self.speculator else {}),
            **self._encoder_cache_stats(),
        }

    def _encoder_cache_stats(self) -> dict[str, int]:
        cache = self.runner.encoder_cache
        if cache is None:
            return {}
        return {"mm_encoder_cache_queries": cache.hits + cache.misses, "mm_encoder_cache_hits": cache.hits,
                "mm_encoder_cache_entries": len(cache)}

    # -- the step --------------------------------------------------------------------------------------------
    def step(self) -> list[CoreOutput]:
        sched = self.scheduler.schedule()
        if not sched:
            return []
        self.num_steps += 1
        self.iteration_tokens.observe(sched.num_tokens)
        outputs = self._step(sched)
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        return outputs

    def _step(self, sched: SchedulerOutput) -> list[CoreOutput]:
        try:
            return self._run(sched)
        except Exception as exc:
            if len(sched.scheduled) == 1:
                return self._fail(sched.scheduled[0].request, exc)
            logger.warning("batched step failed (%s); retrying its %d requests one at a time",
                           exc, len(sched.scheduled))
        outputs: list[CoreOutput] = []
        for item in sched.scheduled:
            if item.request.finished:
                continue
            try:
                outputs.extend(self._run(SchedulerOutput([item])))
            except Exception as exc:
                outputs.extend(self._fail(item.request, exc))
        return outputs

    def _fail(self, request: Request, exc: Exception) -> list[CoreOutput]:
        logger.error("request %s failed: %s: %s", request.request_id, type(exc).__name__, exc)
        message = f"{type(exc).__name__}: {exc}"
        self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
        return [CoreOutput(request.request_id, finish_reason="error", error=message)]

    def _run(self, sched: SchedulerOutput) -> list[CoreOutput]:
        batch = self.runner.prepare(sched)
        grammars = [r.grammar for r in batch.sampling_requests]
        # structured output: the bitmask is filled on a worker thread while the forward pass runs (with drafts,
        # one row per draft position, each after the drafts before it)
        fill = partial(fill_draft_bitmask, grammars, batch.draft_token_ids) if batch.draft_token_ids else \
            partial(fill_grammar_bitmask, grammars)
        mask_job = self._grammar_pool().submit(fill, self.model_config.vocab_size) \
            if any(g is not None for g in grammars) else None
        result = self.runner.execute(batch)
        mask = mask_job.result() if mask_job is not None else None
        new_tokens: list[list[int]] = []
        new_logprobs: list[list[RowLogprobs] | None] = []
        if batch.draft_token_ids:
            logits = result.sample_logits
            if mask is not None:
                logits = apply_token_bitmask(logits, mask)
            verified = self.rejection_sampler(logits, batch.sampling_requests, batch.draft_token_ids)
            new_tokens, new_logprobs = verified.token_ids, verified.logprobs
            self.speculator.record(sum(1 for d in batch.draft_token_ids if d), verified.num_draft_tokens,
                                   verified.num_accepted_tokens)
        elif batch.sampling_requests:
            sampled = self.sampler(result.sample_logits, batch.sampling_requests, mask)
            new_tokens = [[t] for t in sampled.token_ids]
            new_logprobs = [None if lp is None else [lp] for lp in sampled.logprobs]
        outputs = self._update(sched, batch.sampling_requests, new_tokens, new_logprobs, result.prompt_hidden,
                               result.pooled)
        if self.runner.keep_hidden:  # EAGLE reads the positions just computed, with their hidden states
            self.speculator.observe(sched, batch, result.hidden)
        return outputs

    def _grammar_pool(self) -> ThreadPoolExecutor:
        if self._bitmask_pool is None:
            self._bitmask_pool = ThreadPoolExecutor(1, thread_name_prefix="llmctl-bitmask")
        return self._bitmask_pool

    def _update(self, sched: SchedulerOutput, sampling_requests: list[Request], new_tokens: list[list[int]],
                new_logprobs: list[list[RowLogprobs] | None], prompt_hidden, pooled=None) -> list[CoreOutput]:
        outputs: dict[str, CoreOutput] = {}
        accepted = {id(r): len(t) - 1 for r, t in zip(sampling_requests, new_tokens, strict=True)}
        for item in sched.scheduled:
            req = item.request
            req.num_computed_tokens += item.num_new_tokens
            if item.spec_token_ids:
                # Roll back the slots of rejected drafts: their KV is stale and gets overwritten, and blocks
                # holding nothing else go back to the pool.
                req.num_computed_tokens -= len(item.spec_token_ids) - accepted[id(req)]
                self.kv.trim(req)
            self.kv.cache_computed_blocks(req)
        for rid, data in (pooled or {}).items():
            req = self.scheduler.requests[rid]
            outputs[rid] = CoreOutput(rid, finish_reason="stop", pooled=data, num_cached_tokens=req.num_cached_tokens,
                                      first_scheduled_time=req.first_scheduled_time)
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
        for rid, (chunk, hidden) in prompt_hidden.items():
            req = chunk.request
            first = chunk.first_position
            targets = torch.tensor(req.prompt_token_ids[first + 1:first + 1 + len(chunk.rows)], device=hidden.device)
            out = outputs.setdefault(rid, CoreOutput(rid, num_cached_tokens=req.num_cached_tokens,
                                                     first_scheduled_time=req.first_scheduled_time))
            compute = self.runner.model.compute_logits
            if self.lora is not None:  # an adapter on the LM head applies to the request's prompt logprobs too
                compute = self.lora.logits_for(req.lora, compute)
            out.prompt_logprobs = prompt_logprobs_in_slices(hidden, compute, targets,
                                                            req.sampling_params.prompt_logprobs)
            out.prompt_logprobs_start = first + 1
        for req, tokens, lps in zip(sampling_requests, new_tokens, new_logprobs, strict=True):
            out = outputs.setdefault(req.request_id, CoreOutput(req.request_id,
                                                                num_cached_tokens=req.num_cached_tokens,
                                                                first_scheduled_time=req.first_scheduled_time))
            for j, token in enumerate(tokens):
                req.all_token_ids.append(token)
                out.new_token_ids.append(token)
                if lps is not None:
                    out.new_logprobs = (out.new_logprobs or []) + [lps[j]]
                if req.grammar is not None and not req.grammar.accept(token):
                    out.finish_reason, out.error = "error", f"token {token} is not allowed by the request's grammar"
                    self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
                    break
                reason = self._stop_reason(req, token)
                if req.grammar is not None and req.grammar.terminated:  # the grammar took its stop token: done,
                    reason = ("stop", None)  # ignore_eos or not (nothing could follow it)
                if reason is not None:  # tokens accepted after a stop are dropped
                    out.finish_reason, out.stop_reason = reason
                    status = RequestStatus.FINISHED_LENGTH if reason[0] == "length" else RequestStatus.FINISHED_STOPPED
                    self.scheduler.finish(req, status)
                    break
        return list(outputs.values())

    def _stop_reason(self, req: Request, token: int) -> tuple[str, int | str | None] | None:
        sp = req.sampling_params
        n_out = req.num_output_tokens
        if n_out >= sp.min_tokens:
            if not sp.ignore_eos and token in req.eos_token_ids:
                return ("stop", None)
            if token in sp.stop_token_ids:
                return ("stop", token)
        if n_out >= req.max_tokens or req.num_tokens >= self.model_config.max_model_len:
            return ("length", None)
        return None

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """Used by the frontend when a stop string ends a request the core cannot see as finished."""
        req = self.scheduler.requests.get(request_id)
        if req is not None:
            self.scheduler.finish(req, status)


def check_tensor_parallel(args: EngineArgs, hf_config: Any, model_cls: Any, quant: Any) -> None:
    """Refuse, naming the setting, what cannot run split over ``tensor_parallel_size`` ranks."""
    if args.pipeline_parallel_size > 1:
        _check_pipeline_parallel(args, hf_config, model_cls, quant)
    size = args.tensor_parallel_size
    if size == 1:
        return
    if not getattr(model_cls, "supports_tensor_parallel", False):
        archs = "/".join(getattr(hf_config, "architectures", None) or [str(hf_config.model_type)])
        raise ValueError(f"tensor_parallel_size: {archs} runs on {getattr(model_cls, '__name__', model_cls)}, "
                         f"which has no tensor-parallel implementation yet (the Llama family has: Llama, Mistral, "
                         f"Qwen2, Qwen3); use tensor_parallel_size=1")
    if quant is not None:
        raise ValueError(f"tensor_parallel_size: quantized checkpoints ({quant.name}) do not shard yet; use "
                         f"tensor_parallel_size=1")
    check_splittable(hf_config, size)


def _check_pipeline_parallel(args: EngineArgs, hf_config: Any, model_cls: Any, quant: Any) -> None:
    size = args.pipeline_parallel_size
    if not getattr(model_cls, "supports_pipeline_parallel", False):
        archs = "/".join(getattr(hf_config, "architectures", None) or [str(hf_config.model_type)])
        raise ValueError(f"pipeline_parallel_size: {archs} runs on {getattr(model_cls, '__name__', model_cls)}, "
                         f"which has no pipeline-parallel implementation yet (the Llama family has); use "
                         f"pipeline_parallel_size=1")
    if quant is not None:
        raise ValueError(f"pipeline_parallel_size: quantized checkpoints ({quant.name}) are not split yet; use "
                         f"pipeline_parallel_size=1")
    check_pipeline_splittable(hf_config, size)


def _rank_fingerprint(args: EngineArgs, hf_config: Any, dtype: torch.dtype) -> str:
    """What every rank must agree on; the model's path is left out (it may differ between machines)."""
    import json

    cfg = {k: v for k, v in hf_config.to_dict().items() if k != "_name_or_path"}
    settings = (str(dtype), args.seed, args.max_model_len, args.block_size, args.max_num_seqs,
                args.max_num_batched_tokens, args.enable_prefix_caching, args.tensor_parallel_size,
                args.pipeline_parallel_size)
    return json.dumps([cfg, settings], sort_keys=True, default=str)


def _kv_geometry(hf_config) -> tuple[int, int, int | None]:
    cfg = getattr(hf_config, "text_config", None) or hf_config
    heads = cfg.num_attention_heads
    head_size = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    return head_size, kv_heads, window
