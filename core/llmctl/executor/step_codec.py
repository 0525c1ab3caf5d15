"""The typed step message the driver sends every rank (``mp`` over the shared-memory ring, ``ray`` through the
object store), encoded once per step with msgspec's MessagePack codec.

A rank decodes it against this schema only: nothing in it can name a class to instantiate (unlike pickle), and a
message that does not fit the schema fails to decode with an error naming the field. What a ``Request`` holds at
``add_request`` time travels field by field; the rest (its grammar matcher, its generator, its LoRA weights) each
rank rebuilds itself, as before. Tensors travel as dtype, shape and raw bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import msgspec
import torch

from llmctl.engine.request import Request, RequestStatus
from llmctl.executor import messages as msg
from llmctl.lora.request import LoRARequest
from llmctl.pooling.params import PoolingParams
from llmctl.sampling_params import SamplingParams


class TensorMsg(msgspec.Struct, array_like=True, frozen=True):
    dtype: str
    shape: list[int]
    data: bytes


class MMFeatureMsg(msgspec.Struct, array_like=True, frozen=True):
    modality: str
    offset: int
    length: int
    mm_hash: bytes
    pixel_values: TensorMsg
    image_size: tuple[int, int] | None = None
    grid_thw: tuple[int, int, int] | None = None


class RequestMsg(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    request_id: str
    prompt_token_ids: list[int]
    params_id: int  # index into the AddOp's parameter table (requests often share one SamplingParams)
    arrival_time: float
    eos_token_ids: tuple[int, ...] = ()
    max_tokens: int = 16
    leader_id: str | None = None  # a sibling of the same n-group, by id (in this message or already added)
    pooling_params: PoolingParams | None = None
    token_type_ids: list[int] | None = None
    pixel_values: TensorMsg | None = None
    mm_feature_ids: list[int] = []  # indices into the AddOp's feature table (an n-group shares its images)
    lora: LoRARequest | None = None
    cache_salt: bytes | None = None
    encoder_len: int | None = None


class AddOp(msgspec.Struct, tag="add", forbid_unknown_fields=True):
    requests: list[RequestMsg]
    params: list[SamplingParams]
    features: list[MMFeatureMsg] = []


class AbortOp(msgspec.Struct, tag="abort", forbid_unknown_fields=True):
    request_ids: list[str]


class FinishOp(msgspec.Struct, tag="finish", forbid_unknown_fields=True):
    request_id: str
    status: RequestStatus


Op = AddOp | AbortOp | FinishOp


class StepMsg(msgspec.Struct, forbid_unknown_fields=True):
    kind: Literal["step", "sync", "shutdown"]
    ops: list[Op] = []


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StepMsg)


def tensor_msg(t: torch.Tensor) -> TensorMsg:
    t = t.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return TensorMsg(str(t.dtype).removeprefix("torch."), list(t.shape), data)


def tensor_from(m: TensorMsg) -> torch.Tensor:
    dtype = getattr(torch, m.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"step message: unknown tensor dtype {m.dtype!r}")
    if not m.data:
        return torch.empty(m.shape, dtype=dtype)
    return torch.frombuffer(bytearray(m.data), dtype=torch.uint8).view(dtype).reshape(m.shape)


def check_sendable(request: Request) -> None:
    """Refuse what cannot travel to other processes as data, when the request is added (not at the next step)."""
    sp = request.sampling_params
    if sp.logits_processors:
        raise ValueError("logits_processors: per-request Python callables cannot be sent to tensor- or "
                         "pipeline-parallel worker processes; use logit_bias, allowed_token_ids or bad_words")
    if sp.extra_args is not None:
        try:
            _encoder.encode(sp.extra_args)
        except (TypeError, msgspec.EncodeError) as exc:
            raise ValueError(f"extra_args: must hold only JSON-like values to reach the worker processes "
                             f"({exc})") from None


def add_op(requests: list[Request]) -> AddOp:
    features: list[MMFeatureMsg] = []
    feature_index: dict[int, int] = {}
    params: list[SamplingParams] = []
    params_index: dict[int, int] = {}
    out: list[RequestMsg] = []
    for r in requests:
        if id(r.sampling_params) not in params_index:
            params_index[id(r.sampling_params)] = len(params)
            params.append(r.sampling_params)
        ids: list[int] = []
        for f in r.mm_features:
            if id(f) not in feature_index:
                feature_index[id(f)] = len(features)
                features.append(MMFeatureMsg(f.modality, f.offset, f.length, f.mm_hash, tensor_msg(f.pixel_values),
                                             None if f.image_size is None else tuple(f.image_size),
                                             None if f.grid_thw is None else tuple(f.grid_thw)))
            ids.append(feature_index[id(f)])
        lora = r.lora
        if lora is not None and not isinstance(lora, LoRARequest):
            lora = lora.request  # a loaded adapter: only its request travels, each rank loads its own slices
        out.append(RequestMsg(
            request_id=r.request_id, prompt_token_ids=r.prompt_token_ids,
            params_id=params_index[id(r.sampling_params)], arrival_time=r.arrival_time,
            eos_token_ids=tuple(r.eos_token_ids), max_tokens=r.max_tokens,
            leader_id=None if r.leader is None else r.leader.request_id, pooling_params=r.pooling_params,
            token_type_ids=r.token_type_ids,
            pixel_values=None if r.pixel_values is None else tensor_msg(r.pixel_values),
            mm_feature_ids=ids, lora=lora, cache_salt=r.cache_salt, encoder_len=r.encoder_len))
    return AddOp(out, params, features)


def encode_step(kind: str, ops: list[Op]) -> bytes:
    return _encoder.encode(StepMsg(kind, ops))  # type: ignore[arg-type]


def decode_step(payload: bytes | memoryview, known: Mapping[str, Request] | None = None) -> tuple[str, list[Any]]:
    """``(kind, ops)`` with ops as the tuples ``llmctl.executor.worker`` applies (``messages.ADD`` with live
    ``Request`` objects, ``messages.ABORT``, ``messages.FINISH``). ``known``: requests this rank already holds,
    where a leader added in an earlier step is found."""
    try:
        step = _decoder.decode(payload)
    except msgspec.DecodeError as exc:  # malformed, or well-formed but not a step message (ValidationError)
        raise ValueError(f"step message does not fit the schema: {exc}") from None
    ops: list[Any] = []
    for op in step.ops:
        if isinstance(op, AddOp):
            try:
                ops.append((msg.ADD, _requests(op, known or {})))
            except IndexError:
                raise ValueError("step message does not fit the schema: a request's params_id or mm_feature_ids "
                                 "points past its AddOp's tables") from None
        elif isinstance(op, AbortOp):
            ops.append((msg.ABORT, list(op.request_ids)))
        else:
            ops.append((msg.FINISH, op.request_id, op.status))
    return step.kind, ops


def _requests(op: AddOp, known: Mapping[str, Request]) -> list[Request]:
    from llmctl.multimodal.inputs import MultiModalFeature

    features = [MultiModalFeature(f.modality, f.offset, f.length, f.mm_hash, tensor_from(f.pixel_values),
                                  f.image_size, f.grid_thw) for f in op.features]
    made: dict[str, Request] = {}
    out: list[Request] = []
    for m in op.requests:
        leader = None if m.leader_id is None else made.get(m.leader_id, known.get(m.leader_id))
        request = Request(
            request_id=m.request_id, prompt_token_ids=m.prompt_token_ids, sampling_params=op.params[m.params_id],
            arrival_time=m.arrival_time, eos_token_ids=m.eos_token_ids, max_tokens=m.max_tokens, leader=leader,
            pooling_params=m.pooling_params, token_type_ids=m.token_type_ids,
            pixel_values=None if m.pixel_values is None else tensor_from(m.pixel_values),
            mm_features=[features[i] for i in m.mm_feature_ids], lora=m.lora, cache_salt=m.cache_salt,
            encoder_len=m.encoder_len)
        made[m.request_id] = request
        out.append(request)
    return out
