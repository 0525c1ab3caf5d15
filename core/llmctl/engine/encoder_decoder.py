"""The engine's side of encoder-decoder models (BART): how a request's encoder input becomes one flat prompt,
which engine settings such a model cannot run with, and the scheduler's whole-encoder rule.

A request's prompt is ``encoder ids + padding + decoder_start_token_id``: the encoder ids fill the first
``E_pad`` positions (``E`` padded to a KV block boundary; the model writes cross-attention keys/values there) and
the decoder starts at ``E_pad``. The core then schedules, allocates, preempts and prefix-caches it like any
prompt, with two rules: the encoder positions are computed in one chunk (the encoder is bidirectional), and the
prefix-cache chain is salted with a hash of the encoder ids, since every encoder block's cross keys/values
depend on the whole encoder input.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from llmctl.config import ModelConfig
from llmctl.engine.request import Request
from llmctl.layers.cross_attention import padded_encoder_len
from llmctl.sampling_params import SamplingParams


@dataclass(frozen=True)
class EncoderDecoderInputs:
    """What the input processor needs to build an encoder-decoder request."""

    decoder_start_token_id: int
    pad_token_id: int
    max_encoder_len: int  # the encoder's position table
    max_decoder_len: int  # the decoder's: the most tokens it can be fed, so the most it can generate
    block_size: int

    @classmethod
    def from_config(cls, model_config: ModelConfig, block_size: int) -> EncoderDecoderInputs:
        hf_config = model_config.hf_config
        start = (model_config.generation_config or {}).get("decoder_start_token_id")
        if start is None:
            start = getattr(hf_config, "decoder_start_token_id", None)
        if start is None:
            raise ValueError("model: an encoder-decoder checkpoint needs decoder_start_token_id in its config")
        pad = getattr(hf_config, "pad_token_id", None)
        positions = int(hf_config.max_position_embeddings)
        return cls(int(start), int(pad if pad is not None else start), positions,
                   model_config.max_new_tokens or positions, block_size)

    def build_prompt(self, encoder_ids: list[int]) -> tuple[list[int], int]:
        """The engine prompt and the encoder length; refuses an encoder input the position table cannot hold."""
        n = len(encoder_ids)
        if n > self.max_encoder_len:
            raise ValueError(f"prompt: the encoder input has {n} tokens, more than the model's "
                             f"max_position_embeddings ({self.max_encoder_len})")
        pad = padded_encoder_len(n, self.block_size) - n
        return list(encoder_ids) + [self.pad_token_id] * pad + [self.decoder_start_token_id], n

    def decoder_params(self, params: SamplingParams, num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
        """``params`` with ``max_tokens`` within the decoder's positions: refused when set beyond them, bounded
        by them when left unset (so the KV capacity check counts what the request can really use)."""
        limit = self.max_decoder_len
        if params.max_tokens is not None:
            if params.max_tokens > limit:
                raise ValueError(f"max_tokens: {params.max_tokens} exceeds the decoder's max_position_embeddings "
                                 f"({limit})")
            return params
        return params.clone(max_tokens=max(1, min(limit, max_model_len - num_prompt_tokens)))


def encoder_salt(encoder_ids: list[int]) -> bytes:
    """Seeds a request's prefix-cache hash chain: cross keys/values are shared only between equal encoder inputs."""
    h = hashlib.blake2b(b"encoder:", digest_size=16)
    h.update(",".join(map(str, encoder_ids)).encode())
    return h.digest()


def encoder_chunk_ok(request: Request, num_cached_tokens: int, num_new_tokens: int) -> bool:
    """Whether a chunk starting after ``num_cached_tokens`` cached tokens covers the rest of the encoder positions
    (the encoder runs whole or not at all)."""
    if request.encoder_len is None:
        return True
    e_pad = len(request.prompt_token_ids) - 1
    start = request.num_computed_tokens + num_cached_tokens
    return start >= e_pad or start + num_new_tokens >= e_pad


def usable_prefix(request: Request, cached: list, block_size: int) -> list:
    """A prefix hit that ends inside the encoder is dropped: the encoder must run whole to write the rest."""
    if request.encoder_len is None or len(cached) * block_size >= len(request.prompt_token_ids) - 1:
        return cached
    return []


def check_engine(model: Any, args: Any, max_num_batched_tokens: int) -> None:
    """Refuse, naming the setting, what an encoder-decoder model cannot run with."""
    if not getattr(model, "is_encoder_decoder", False):
        return
    if args.speculative_config:
        raise ValueError("speculative_config: not supported with encoder-decoder models")
    if args.enable_lora:
        raise ValueError("enable_lora: LoRA adapters are not supported with encoder-decoder models")
    if args.data_parallel_size > 1 or args.executor_backend != "uni":
        # the frontend builds encoder-decoder prompts from the model it holds; a remote core's frontend holds none
        raise ValueError("distributed_executor_backend: encoder-decoder models run in-process ('uni', "
                         "data_parallel_size=1)")
    longest = padded_encoder_len(model.max_encoder_len(model.config), args.block_size)
    if max_num_batched_tokens < longest:
        raise ValueError(f"max_num_batched_tokens: an encoder-decoder model computes a prompt's encoder in one step, "
                         f"so it must be >= the longest padded encoder input ({longest}), got "
                         f"{max_num_batched_tokens}")
