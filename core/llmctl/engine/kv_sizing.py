"""KV cache sizing at start-up: how many blocks the cache gets, and the profiling step a platform measures.

The budget is the user's ``kv_cache_memory`` when set, else what the platform measures by running the largest
step the scheduler can form, else a share of ``memory_info``'s free memory (capped, since host memory is shared).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from llmctl.attention import build_attention_metadata
from llmctl.config import CacheConfig, SchedulerConfig
from llmctl.kv.cache_dtype import kv_row_width
from llmctl.models.base import KVCacheSpec
from llmctl.tensor_parallel import agree_min

if TYPE_CHECKING:
    from llmctl.engine.startup import EngineStartup

# Start-up logs under the engine core's name, as before start-up had its own module, so log filters keep working.
logger = logging.getLogger("llmctl.engine.core")

DEFAULT_KV_FRACTION = 0.25
DEFAULT_KV_CAP_BYTES = 4 << 30

def size_kv_cache(s: EngineStartup, spec: KVCacheSpec, dtype: torch.dtype) -> CacheConfig:
    """Blocks for the KV cache: the user's ``kv_cache_memory`` when set, else what the platform measures by
    profiling, else a share of ``memory_info``'s free memory (capped, since host memory is shared). Every rank
    ends up with the fewest any rank can hold."""
    args = s.args
    cache_dtype = s.kv_cache_dtype
    elem = torch.tensor([], dtype=cache_dtype).element_size()
    # an 8-bit cache's rows carry their scales, which the budget counts like the codes
    row = kv_row_width(spec.head_size, cache_dtype)
    bytes_per_block = 2 * spec.num_layers * args.block_size * spec.num_kv_heads * row * elem
    max_len = s.model_config.max_model_len
    blocks_per_seq = -(-max_len // args.block_size)
    kv = args.kv_cache_memory
    profiled = _profiled_kv_bytes(s, spec, bytes_per_block) if kv is None else None
    if profiled is not None:
        budget, source = profiled, "profiling"
    elif kv is None:
        budget, source = min(int(_free_memory(s.platform) * DEFAULT_KV_FRACTION), DEFAULT_KV_CAP_BYTES), "memory_info"
    elif isinstance(kv, float):
        budget, source = int(_free_memory(s.platform) * kv), "kv_cache_memory"
    else:
        budget, source = int(kv), "kv_cache_memory"
    if args.gpu_memory_utilization is not None and source != "profiling":
        logger.warning("gpu_memory_utilization=%s has no effect: %s", args.gpu_memory_utilization,
                       "kv_cache_memory is set" if kv is not None else
                       f"platform {s.platform.name} does not size the KV cache by profiling")
    num_blocks = budget // bytes_per_block
    if source == "profiling" and num_blocks < blocks_per_seq:
        util = args.gpu_memory_utilization
        raise ValueError(
            f"gpu_memory_utilization: after the weights and a profiled step of "
            f"{s.scheduler_config.max_num_batched_tokens} tokens, {budget} bytes are left for the KV cache "
            f"(gpu_memory_utilization={util if util is not None else 'platform default'}), fewer than one "
            f"sequence of max_model_len={max_len} needs ({blocks_per_seq * bytes_per_block} bytes); raise "
            f"gpu_memory_utilization, lower max_model_len or max_num_batched_tokens, or set kv_cache_memory")
    # Never more than every sequence at full length could use: memory beyond that is dead weight.
    useful = args.max_num_seqs * blocks_per_seq + 1
    if args.kv_cache_memory is None:
        num_blocks = min(num_blocks, useful)
    # Every rank schedules the same requests, so all must have as many blocks as the one with the fewest.
    num_blocks = agree_min(s.world, int(num_blocks))
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory: {budget} bytes is less than one KV block ({bytes_per_block} bytes)")
    logger.info("KV cache: %d blocks of %d tokens (%.2f GiB, from %s); max concurrency %.2fx requests "
                "of max_model_len=%d", num_blocks, args.block_size, num_blocks * bytes_per_block / 2**30,
                source, num_blocks / blocks_per_seq, max_len)
    return CacheConfig(args.block_size, int(num_blocks), args.enable_prefix_caching, bytes_per_block,
                       cache_dtype)



def _free_memory(platform: Any) -> int:
    try:
        return platform.memory_info()[0]
    except NotImplementedError:
        return DEFAULT_KV_CAP_BYTES



def _profiled_kv_bytes(s: EngineStartup, spec: KVCacheSpec, bytes_per_block: int) -> int | None:
    run_forward = profile_step(s.model, s.attention, s.scheduler_config, s.args.block_size, s.kv_cache_dtype, spec,
                               s.device, pooling=s.runner_plan.pooling, limit_mm_per_prompt=s.args.limit_mm_per_prompt)
    kv_bytes = s.platform.profile_kv_cache_bytes(
        run_forward, gpu_memory_utilization=s.args.gpu_memory_utilization, bytes_per_block=bytes_per_block,
        block_size=s.args.block_size, max_model_len=s.model_config.max_model_len,
        device_index=s.device.index or 0)
    return None if kv_bytes is None else int(kv_bytes)


def profile_step(model: torch.nn.Module, attention: Any, sched: SchedulerConfig, block_size: int,
                 kv_cache_dtype: torch.dtype, spec: KVCacheSpec, device: torch.device, *, pooling: bool,
                 limit_mm_per_prompt: Any = None) -> Callable[[], None]:
    """The largest step the scheduler can form, for a platform to measure peak activation memory on.

    ``max_num_batched_tokens`` tokens (no more than ``max_num_seqs`` sequences can hold) in sequences of
    ``max_model_len`` and one remainder, since attention's scratch grows with the longest sequence; logits
    for as many rows as can sample in one step. The KV cache is a zeroed single block per layer that every
    block table points at, with no slot written: reads cost what they would in a real step, the memory
    stays negligible, and it is freed when the call returns.
    """
    max_len = sched.max_model_len
    total = min(sched.max_num_batched_tokens, sched.max_num_seqs * max_len)
    full, rest = divmod(total, max_len)
    lens = [max_len] * full + ([rest] if rest else [])
    sample_rows = min(sched.max_num_seqs, total)
    dev = device

    @torch.inference_mode()
    def run_forward() -> None:
        shape = attention.kv_cache_shape(1, block_size, spec.num_kv_heads, kv_row_width(spec.head_size, kv_cache_dtype))
        caches = [torch.zeros(shape, dtype=kv_cache_dtype, device=dev) for _ in range(spec.num_layers)]
        metadata = build_attention_metadata(
            list(lens), list(lens), torch.zeros((len(lens), -(-max(lens) // block_size)), dtype=torch.int32),
            torch.full((total,), -1, dtype=torch.int64), block_size, dev)
        positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lens]).to(dev)
        input_ids = torch.zeros(total, dtype=torch.int64, device=dev)
        extra = {}
        if getattr(model, "supports_multimodal", False):
            extra["inputs_embeds"] = _profile_image_embeddings(model, input_ids, len(lens), limit_mm_per_prompt)
        hidden = model(input_ids, positions, caches, metadata, **extra)
        if not pooling:
            model.compute_logits(hidden[:sample_rows]).float()  # the sampler's float32 copy counts too
        del hidden, caches, metadata

    return run_forward


def _profile_image_embeddings(model: Any, input_ids: torch.Tensor, num_seqs: int,
                              limit_mm_per_prompt: Any) -> torch.Tensor:
    """A step filled with the most worst-case images it can touch (each sequence may start inside one and
    end inside another), encoded in one call as the runner would, their rows merged over the embeddings:
    the vision tower's activations and the encoder outputs count in the profiled peak."""
    _, per_image = model.largest_image()
    total = input_ids.shape[0]
    from llmctl.multimodal.processor import parse_limit_mm_per_prompt

    limit = parse_limit_mm_per_prompt(limit_mm_per_prompt)["image"]
    count = max(1, min(-(-total // per_image) + num_seqs, limit * num_seqs))
    rows = model.embed_multimodal(model.dummy_features(count))
    embeds = model.embed_input_ids(input_ids)
    flat = torch.cat(rows)[:total]
    embeds[:flat.shape[0]] = flat.to(embeds.dtype)
    return embeds

