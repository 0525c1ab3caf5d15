"""The typed step message: every field a request carries when it is added survives the trip to a rank, an n-group
keeps pointing at its leader and sharing its images, and what is not data (a Python callable, a pickle) is refused
by name rather than sent or loaded."""

from __future__ import annotations

import pickle

import pytest
import torch
from llmctl.engine.request import Request, RequestStatus
from llmctl.executor import messages as msg
from llmctl.executor import step_codec
from llmctl.executor.remote import encode_ops
from llmctl.lora.request import LoRARequest
from llmctl.multimodal.inputs import MultiModalFeature
from llmctl.pooling.params import PoolingParams
from llmctl.sampling_params import SamplingParams
from llmctl.structured_output import StructuredOutputsParams

# What the driver never sends: rebuilt by each rank (generator from the seed, grammar, loaded adapter) or state
# that only exists after the first step.
_NOT_SENT = {"generator", "grammar", "leader", "mm_features", "pixel_values"}


def _requests() -> list[Request]:
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=11, stop=["\n", "end"], stop_token_ids=[7],
                        logit_bias={3: -2.5, 9: 1.0}, allowed_token_ids=[1, 2, 3, 9], max_tokens=12, logprobs=2,
                        extra_args={"tag": "x", "weights": [1, 2.5]},
                        structured_outputs=StructuredOutputsParams(json={"type": "object"}))
    sp._eos_token_ids = (2, 5)
    sp._bad_words_token_ids = [[4, 5]]
    image = MultiModalFeature("image", 1, 3, b"\x01hash", torch.randn(3, 4, 4), image_size=(4, 4),
                              grid_thw=(1, 2, 2))
    leader = Request("0_r", [1, 2, 3, 4, 5], sp, 123.5, eos_token_ids=(2,), max_tokens=12, mm_features=[image],
                     cache_salt=b"salt", lora=LoRARequest("ad", 3, "/adapters/ad"))
    child = Request("1_r", [1, 2, 3, 4, 5], sp.clone(seed=12, n=1), 123.5, eos_token_ids=(2,), max_tokens=12,
                    leader=leader, mm_features=[image], cache_salt=b"salt")
    pooled = Request("p", [1, 6, 2], SamplingParams(max_tokens=1), 124.0, pooling_params=PoolingParams(task="embed"),
                     token_type_ids=[0, 0, 1], pixel_values=torch.arange(12, dtype=torch.bfloat16).reshape(3, 2, 2))
    enc = Request("e", [8, 8, 0, 0, 1], SamplingParams(temperature=0.0), 125.0, encoder_len=2)
    return [leader, child, pooled, enc]


def _fields(r: Request) -> dict:
    return {k: v for k, v in vars(r).items() if k not in _NOT_SENT}


def test_step_message_round_trips_every_sent_field():
    sent = _requests()
    ops = [(msg.ADD, sent), (msg.ABORT, ["gone", "also"]), (msg.FINISH, "done", RequestStatus.FINISHED_STOPPED)]
    kind, got = step_codec.decode_step(encode_ops(msg.STEP, ops))
    assert kind == msg.STEP
    assert got[1] == (msg.ABORT, ["gone", "also"])
    assert got[2] == (msg.FINISH, "done", RequestStatus.FINISHED_STOPPED)
    assert got[0][0] == msg.ADD
    received = got[0][1]
    for s, r in zip(sent, received, strict=True):
        assert _fields(r) == _fields(s)
        assert r.sampling_params == s.sampling_params
        assert r.sampling_params._eos_token_ids == s.sampling_params._eos_token_ids
        assert r.sampling_params._bad_words_token_ids == s.sampling_params._bad_words_token_ids
        if s.generator is not None:  # the same seeded stream on every rank
            assert torch.equal(r.generator.get_state(), s.generator.get_state())
        assert len(r.mm_features) == len(s.mm_features)
        for rf, sf in zip(r.mm_features, s.mm_features, strict=True):
            assert (rf.modality, rf.offset, rf.length, rf.mm_hash, rf.image_size, rf.grid_thw) == \
                   (sf.modality, sf.offset, sf.length, sf.mm_hash, sf.image_size, sf.grid_thw)
            assert torch.equal(rf.pixel_values, sf.pixel_values)
    leader, child, pooled, _ = received
    assert child.leader is leader  # the n-group keeps its leader, and shares one decoded image
    assert child.mm_features[0] is leader.mm_features[0]
    assert pooled.pixel_values.dtype == torch.bfloat16 and torch.equal(pooled.pixel_values, sent[2].pixel_values)
    assert leader.lora == LoRARequest("ad", 3, "/adapters/ad")


def test_a_leader_added_in_an_earlier_step_is_found_among_the_ranks_requests():
    leader, child = _requests()[:2]
    _, ops = step_codec.decode_step(encode_ops(msg.STEP, [(msg.ADD, [child])]), known={"0_r": leader})
    assert ops[0][1][0].leader is leader


def test_requests_sharing_parameters_decode_sharing_them():
    sp = SamplingParams(temperature=0.5, stop=["x"])
    reqs = [Request(f"r{i}", [1, 2, i], sp, 1.0) for i in range(3)] + [Request("own", [3], SamplingParams(), 1.0)]
    add = step_codec.add_op(reqs)
    assert len(add.params) == 2
    _, ops = step_codec.decode_step(step_codec.encode_step(msg.STEP, [add]))
    got = ops[0][1]
    assert got[0].sampling_params is got[1].sampling_params is got[2].sampling_params
    assert got[0].sampling_params == sp and got[3].sampling_params == SamplingParams()


def test_empty_steps_and_shutdown_encode_small():
    payload = encode_ops(msg.STEP, [])
    assert len(payload) < 32
    assert step_codec.decode_step(payload) == (msg.STEP, [])
    assert step_codec.decode_step(step_codec.encode_step(msg.SHUTDOWN, []))[0] == msg.SHUTDOWN


def test_a_callable_is_refused_when_the_request_is_added():
    r = Request("c", [1, 2], SamplingParams(logits_processors=[lambda ids, logits: logits]), 1.0)
    with pytest.raises(ValueError, match="logits_processors: per-request Python callables cannot be sent"):
        step_codec.check_sendable(r)
    r = Request("c", [1, 2], SamplingParams(extra_args={"f": object()}), 1.0)
    with pytest.raises(ValueError, match="extra_args: must hold only JSON-like values"):
        step_codec.check_sendable(r)


def test_messages_outside_the_schema_are_refused_not_loaded():
    import msgspec

    with pytest.raises(ValueError, match=r"step message does not fit the schema: .*\$\.kind"):
        step_codec.decode_step(msgspec.msgpack.encode({"kind": "exec", "ops": []}))
    with pytest.raises(ValueError, match=r"does not fit the schema: .*\$\.ops\[0\]"):
        step_codec.decode_step(msgspec.msgpack.encode({"kind": "step", "ops": [{"type": "add", "requests": 3}]}))
    bad = step_codec.add_op([Request("r", [1], SamplingParams(), 1.0)])
    bad.requests[0].params_id = 5
    with pytest.raises(ValueError, match="params_id or mm_feature_ids points past"):
        step_codec.decode_step(step_codec.encode_step(msg.STEP, [bad]))
    # a pickle is just bytes that are not a step message: nothing in it is imported or called
    with pytest.raises(ValueError, match="step message does not fit the schema"):
        step_codec.decode_step(pickle.dumps((msg.STEP, [(msg.ABORT, ["x"])])))
