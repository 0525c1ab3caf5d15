"""Engine start-up: everything the step needs, built once.

Start-up resolves the platform and the configuration, loads the model (with its LoRA slots and the draft model or
head of speculative decoding), sizes the KV cache (``kv_sizing``: the user's budget, the platform's profiling pass
or a share of free memory), allocates it and captures the decode graphs. Its result, :class:`EngineParts`, is what
:class:`llmctl.engine.core.EngineCore` steps; nothing here runs per step.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from llmctl.config import CacheConfig, EngineArgs, ModelConfig, SchedulerConfig
from llmctl.engine.batch_queue import MICRO_BATCHES_ENV
from llmctl.engine.encoder_decoder import check_engine as check_encoder_decoder
from llmctl.engine.kv_sizing import size_kv_cache
from llmctl.engine.malloc_tuning import keep_heap_headroom
from llmctl.engine.model_runner import ModelRunner
from llmctl.engine.sampler import Sampler
from llmctl.engine.scheduler import Scheduler
from llmctl.expert_parallel import check_expert_parallel, expert_parallel_mode, init_expert_world
from llmctl.kv.cache_dtype import kv_dtype_name, kv_feature, kv_row_width, kv_storage_dtype
from llmctl.kv.manager import KVCacheManager
from llmctl.models.base import ModelContext
from llmctl.plugins import get_plugin_manager
from llmctl.plugins.types import AttentionBackend, Platform
from llmctl.spec_decode.config import SpeculativeConfig
from llmctl.spec_decode.draft_proposer import load_draft_proposer, resolve_draft_model
from llmctl.spec_decode.eagle import load_eagle_proposer, resolve_eagle_head
from llmctl.spec_decode.eagle3 import load_eagle3_proposer, resolve_eagle3_head
from llmctl.spec_decode.rejection_sampler import RejectionSampler
from llmctl.spec_decode.speculator import Speculator
from llmctl.tensor_parallel import (
    PipelineStage,
    RankAddress,
    TensorParallelGroup,
    check_pipeline_splittable,
    check_same_model,
    check_splittable,
    init_group,
    launcher_address,
    split_world,
)

# Start-up logs under the engine core's name, as before start-up had its own module, so log filters keep working.
logger = logging.getLogger("llmctl.engine.core")


@dataclass
class EngineParts:
    """What start-up hands the step loop: the configuration it settled on and the components it built."""

    args: EngineArgs
    platform: Platform
    source: Any  # the resolved checkpoint (llmctl.loader.source.ModelSource)
    runner_plan: Any  # llmctl.pooling.setup's plan: generate or pooling, the model class, the pooler
    world: TensorParallelGroup
    ep: TensorParallelGroup | None  # expert parallelism across data-parallel replicas: every replica's ranks
    tp: TensorParallelGroup
    pp: PipelineStage
    device: torch.device
    model_config: ModelConfig
    scheduler_config: SchedulerConfig
    cache_config: CacheConfig
    kv_cache_dtype: torch.dtype
    attention: AttentionBackend
    ops: Any  # llmctl.ops.Ops
    model: torch.nn.Module
    model_impl: str
    lora: Any  # llmctl.lora.manager.LoRAManager, or None
    kv: KVCacheManager
    scheduler: Scheduler
    runner: ModelRunner
    sampler: Sampler
    rejection_sampler: RejectionSampler
    speculator: Speculator | None


def build_engine(args: EngineArgs, rank: RankAddress | None = None) -> EngineParts:
    """``rank``: this process's place in a tensor-parallel group, as the ``mp`` executor's workers pass it; with
    ``external_launcher`` it comes from the launcher's environment, and without parallelism it is rank 0 of 1."""
    s = EngineStartup(args, rank)
    return EngineParts(
        args=s.args, platform=s.platform, source=s.source, runner_plan=s.runner_plan, world=s.world, ep=s.ep, tp=s.tp,
        pp=s.pp, device=s.device, model_config=s.model_config, scheduler_config=s.scheduler_config,
        cache_config=s.cache_config, kv_cache_dtype=s.kv_cache_dtype, attention=s.attention, ops=s.ops,
        model=s.model, model_impl=s.model_impl, lora=s.lora, kv=s.kv, scheduler=s.scheduler, runner=s.runner,
        sampler=s.sampler, rejection_sampler=s.rejection_sampler, speculator=s.speculator)


class EngineStartup:
    """The start-up sequence, in order. Its attributes fill in as it goes; the draft proposers' loaders read the
    ones set before them (model config, platform, ops, device, cache config, KV manager, target model)."""

    def __init__(self, args: EngineArgs, rank: RankAddress | None = None) -> None:
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
        from llmctl.quantization import resolve_quant_config

        quant = resolve_quant_config(args.quantization, self.source)
        check_tensor_parallel(args, hf_config, self.runner_plan.model_cls, quant)  # before waiting for peers
        address = rank or (launcher_address(args.world_size)
                           if args.executor_backend == "external_launcher" else RankAddress(0, 1, ""))
        if address.world_size != args.world_size:
            raise ValueError(f"tensor_parallel_size: {args.tensor_parallel_size} x pipeline_parallel_size "
                             f"{args.pipeline_parallel_size} ranks, but this process was started as rank "
                             f"{address.rank} of {address.world_size}")
        # Every rank of the replica in one group; with both kinds of parallelism, each stage's tensor-parallel
        # group and each pipeline are sub-groups of it (tensor_parallel.RankLayout).
        communicator = plugins.registry.communicator_for(self.platform.name)
        self.ep: TensorParallelGroup | None = None
        if address.data_parallel is not None:  # the replicas share their experts: one group over all their ranks
            self.ep, self.world = init_expert_world(address, communicator, self.platform.name)
        else:
            self.world = init_group(address, communicator, self.platform.name)
        self.tp, self.pp = split_world(self.world, args.tensor_parallel_size, args.pipeline_parallel_size)
        self.device = self.platform.torch_device(address.local_rank) if self.world.size > 1 else \
            self.platform.torch_device()
        dtype = resolve_dtype(args.dtype, hf_config, self.platform.supported_dtypes(),
                              quantized_checkpoint=self.source.gguf_file is not None,
                              emulated_dtypes=self.platform.emulated_dtypes())
        check_same_model(self.world, _rank_fingerprint(args, hf_config, dtype))
        if self.ep is not None:
            check_same_model(self.ep, _rank_fingerprint(args, hf_config, dtype))
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
                                  "pooler_config": self.runner_plan.pooler_config}, tp=self.tp, pp=self.pp,
                           expert_parallel=args.enable_expert_parallel, ep=self.ep)
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
                                                max_loras=lora_config.max_loras if lora_config else None,
                                                long_prefill_token_threshold=args.long_prefill_token_threshold,
                                                max_num_partial_prefills=args.max_num_partial_prefills or 0,
                                                min_decode_steps_between_prefills=(
                                                    args.min_decode_steps_between_prefills or 0))
        check_encoder_decoder(self.model, args, mnbt)
        self.cache_config = size_kv_cache(self, spec, dtype)
        shape = self.attention.kv_cache_shape(self.cache_config.num_blocks, args.block_size, spec.num_kv_heads,
                                              kv_row_width(spec.head_size, self.kv_cache_dtype))
        # torch.empty: pages are committed only when written, and backends never read a slot before writing it
        # (the testkit poisons unused slots to hold them to that).
        kv_caches = [torch.empty(shape, dtype=self.kv_cache_dtype, device=self.device)
                     for _ in range(spec.num_layers)]
        kv_reached = self.platform.prepare_kv_cache(kv_caches, self.cache_config.num_blocks)
        self.kv = KVCacheManager(self.cache_config.num_blocks, args.block_size,
                                 args.enable_prefix_caching and not self.runner_plan.pooling)
        self.kv.add_reached_listener(kv_reached)
        self.scheduler = Scheduler(self.scheduler_config, self.kv)
        draft = load_draft_proposer(draft_source, self) if draft_source is not None else \
            load_eagle_proposer(eagle_source, self) if eagle_source is not None else \
            load_eagle3_proposer(eagle3_source, self) if eagle3_source is not None else None
        self.speculator = Speculator(spec_config, self.model_config.max_model_len, draft) if spec_config else None
        self.runner = ModelRunner(self.model, kv_caches, args.block_size, self.device, lora=self.lora)
        self.runner.keep_hidden = self.speculator is not None and self.speculator.wants_hidden
        self.runner.keep_aux_hidden = eagle3_source is not None
        if self.speculator is not None:  # verification steps run one row per token, like decodes
            self.runner.max_flat_query_len = 1 + spec_config.num_speculative_tokens
        decode_graphs = self._init_decode_graphs()
        self.sampler = Sampler(self.ops, args.seed)
        self.rejection_sampler = RejectionSampler(self.sampler)
        logger.info("llmctl engine: platform=%s attention=%s dtype=%s kv_cache_dtype=%s kv_blocks=%d (block_size=%d) "
                    "max_model_len=%d decode_graphs=%s quantization=%s", self.platform.name, self.attention.name, dtype,
                    kv_dtype_name(self.kv_cache_dtype), self.cache_config.num_blocks, args.block_size,
                    self.model_config.max_model_len, decode_graphs,
                    summary.describe() if summary is not None else "none")

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

    def _init_decode_graphs(self) -> str:
        """Ask the platform for a decode-step runner and capture it now that the KV cache exists; the returned
        words go into the start-up log so a user sees why steps run eagerly."""
        if self.args.enforce_eager:
            return "off (enforce_eager)"
        if self.runner_plan.pooling:
            return "off (pooling runner: prefill only)"
        if getattr(self.model, "is_encoder_decoder", False):
            return "off (encoder-decoder: cross-attention lengths vary per step)"
        if self.ep is not None:
            return "off (expert parallelism across replicas: the step's all-to-alls vary in size)"
        if self.world.size > 1:
            return "off (tensor/pipeline parallel: the step's collectives run eagerly)"
        if self.lora is not None:
            return "off (LoRA: adapters switch per step)"
        if self.runner.keep_aux_hidden:
            return "off (eagle3: the head reads intermediate hidden states a captured step does not return)"
        if not getattr(self.attention, "supports_graph_capture", False):
            return f"off (attention backend {self.attention.name} cannot be captured)"
        # a verification step has one row per token: the last one plus each draft
        rows = self.args.max_num_seqs * self.runner.max_flat_query_len
        return self.runner.capture_decode_graphs(self.platform, rows, self.model_config.max_model_len)

def check_tensor_parallel(args: EngineArgs, hf_config: Any, model_cls: Any, quant: Any) -> None:
    """Refuse, naming the setting, what cannot run split over ``tensor_parallel_size`` ranks."""
    if args.pipeline_parallel_size > 1:
        _check_pipeline_parallel(args, hf_config, model_cls, quant)
    if args.enable_expert_parallel:  # its own refusals first, naming enable_expert_parallel
        check_expert_parallel(hf_config, model_cls, args.tensor_parallel_size, quant, args.data_parallel_size)
    size = args.tensor_parallel_size
    if size == 1:
        return
    if not getattr(model_cls, "supports_tensor_parallel", False):
        archs = "/".join(getattr(hf_config, "architectures", None) or [str(hf_config.model_type)])
        raise ValueError(f"tensor_parallel_size: {archs} runs on {getattr(model_cls, '__name__', model_cls)}, "
                         f"which has no tensor-parallel implementation yet (the Llama family and the native "
                         f"decoder families have); use tensor_parallel_size=1")
    model_check = getattr(model_cls, "check_tensor_parallel", None)  # a model's own limits (the decoder families')
    if callable(model_check):
        model_check(hf_config, size, quant, expert_parallel=args.enable_expert_parallel)
        return
    check_splittable(hf_config, size)
    if quant is not None:  # a split that would cut a quantization group or block is refused before ranks start
        from llmctl.quantization.sharding import check_row_splits

        check_row_splits(quant, hf_config, size)


def _check_pipeline_parallel(args: EngineArgs, hf_config: Any, model_cls: Any, quant: Any) -> None:
    size = args.pipeline_parallel_size
    if not getattr(model_cls, "supports_pipeline_parallel", False):
        archs = "/".join(getattr(hf_config, "architectures", None) or [str(hf_config.model_type)])
        raise ValueError(f"pipeline_parallel_size: {archs} runs on {getattr(model_cls, '__name__', model_cls)}, "
                         f"which has no pipeline-parallel implementation yet (the Llama family and the native "
                         f"decoder families have); use pipeline_parallel_size=1")
    # A quantized checkpoint needs nothing more: a stage attaches quantizers to its own layers only and leaves the
    # other stages' tensors unread (tensor parallelism within a stage is checked by check_tensor_parallel).
    check_pipeline_splittable(hf_config, size)


def _rank_fingerprint(args: EngineArgs, hf_config: Any, dtype: torch.dtype) -> str:
    """What every rank must agree on; the model's path is left out (it may differ between machines)."""
    import json

    cfg = {k: v for k, v in hf_config.to_dict().items() if k != "_name_or_path"}
    settings = (str(dtype), args.seed, args.max_model_len, args.block_size, args.max_num_seqs,
                args.max_num_batched_tokens, args.long_prefill_token_threshold, args.max_num_partial_prefills,
                args.min_decode_steps_between_prefills,
                args.enable_prefix_caching, args.tensor_parallel_size,
                args.pipeline_parallel_size, args.enable_expert_parallel,
                args.enable_expert_parallel and expert_parallel_mode(), os.environ.get(MICRO_BATCHES_ENV, ""))
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
