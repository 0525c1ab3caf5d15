"""The engine side of structured output without a model: the bitmask layout against xgrammar's own kernel,
the manager's bounded cache, and a constraint that waits for the end of the reasoning."""

from __future__ import annotations

import pytest
import torch
import xgrammar as xgr
from llmctl.structured_output import StructuredOutputsParams
from llmctl.structured_output.manager import StructuredOutputManager
from llmctl.structured_output.request_grammar import apply_token_bitmask, fill_grammar_bitmask


@pytest.fixture(scope="module")
def manager(test_tokenizer):
    return StructuredOutputManager(test_tokenizer, len(test_tokenizer), (test_tokenizer.eos_token_id,),
                                   max_cache_entries=2)


def test_bitmask_matches_xgrammar_kernel(manager, test_tokenizer):
    vocab = len(test_tokenizer)
    grammars = [None, manager.request_grammar(manager.compile(StructuredOutputsParams(regex=r"[0-9]{2}")),
                                              StructuredOutputsParams(regex=r"[0-9]{2}")), None]
    mask = fill_grammar_bitmask(grammars, vocab)
    assert mask is not None and mask.rows == [1]
    logits = torch.randn(3, vocab)
    ours = apply_token_bitmask(logits, mask)
    ref = logits.clone()
    full = torch.full((3, mask.bitmask.shape[1]), -1, dtype=torch.int32)
    full[1] = mask.bitmask[0]
    xgr.apply_token_bitmask_inplace(ref, full)  # xgrammar's reference kernel
    assert torch.equal(ours, ref)
    assert torch.equal(ours[0], logits[0]) and torch.isinf(ours[1]).sum() > vocab - 20
    allowed = torch.isfinite(ours[1]).nonzero().flatten().tolist()
    assert allowed and all(test_tokenizer.decode([t]).strip().isdigit() for t in allowed)
    assert fill_grammar_bitmask([None, None], vocab) is None  # unconstrained batches pay nothing


def test_cache_is_bounded_and_shared(manager):
    a = StructuredOutputsParams(choice=["a", "b"])
    first = manager.compile(a)
    assert manager.compile(StructuredOutputsParams(choice=["a", "b"])) is first  # one compile per constraint
    for i in range(4):
        manager.compile(StructuredOutputsParams(choice=[f"x{i}"]))
    info = manager.cache_info()
    assert info["entries"] == 2 and info["bytes"] > 0
    assert manager.compile(a) is not first  # evicted (LRU), compiled again


def test_constraint_waits_for_the_end_of_reasoning(manager, test_tokenizer):
    end = tuple(test_tokenizer.encode("</think>", add_special_tokens=False))
    params = StructuredOutputsParams(choice=["yes"], reasoning_end_token_ids=list(end))
    grammar = manager.request_grammar(manager.compile(params), params)
    assert fill_grammar_bitmask([grammar], len(test_tokenizer)) is None  # still reasoning: unconstrained
    free_text = test_tokenizer.encode("let me think", add_special_tokens=False)
    for t in free_text + list(end):
        assert grammar.accept(t)
    mask = fill_grammar_bitmask([grammar], len(test_tokenizer))
    assert mask is not None and mask.rows == [0]
    assert grammar.accept(test_tokenizer.encode("yes", add_special_tokens=False)[0])
    assert not grammar.accept(test_tokenizer.encode(" no", add_special_tokens=False)[0])


def test_static_checks_name_the_field():
    with pytest.raises(ValueError, match=r"structured_outputs: exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match=r"structured_outputs.regex: .*lookaround"):
        StructuredOutputsParams(regex="(?=a)a")
    with pytest.raises(ValueError, match=r"structured_outputs.json.properties.a.maxItems: .* cap"):
        StructuredOutputsParams(json={"properties": {"a": {"type": "array", "maxItems": 10**6}}})


def test_cache_is_bounded_in_bytes(test_tokenizer):
    """The byte bound evicts the oldest grammars whatever the entry count; the cache never holds more."""
    m = StructuredOutputManager(test_tokenizer, len(test_tokenizer), (test_tokenizer.eos_token_id,))
    one = m.compile(StructuredOutputsParams(regex=r"[a-z]{1,8}"))
    size = m.cache_info()["bytes"]
    assert one.backend == "xgrammar" and size > 0
    m.max_cache_bytes = int(size * 2.5)
    for i in range(6):
        m.compile(StructuredOutputsParams(regex=rf"[a-z]{{1,8}}{i}"))
        info = m.cache_info()
        assert info["bytes"] <= m.max_cache_bytes and info["entries"] <= 2 + 1
    assert m.compile(StructuredOutputsParams(regex=r"[a-z]{1,8}")) is not one  # the first was evicted


def test_a_shared_compile_names_each_requests_field(test_tokenizer):
    """Two requests asking for the same constraint under different fields wait on one compile; its refusal names
    each request's own field."""
    import threading

    m = StructuredOutputManager(test_tokenizer, len(test_tokenizer), (test_tokenizer.eos_token_id,),
                                backend="xgrammar")
    backend = m.backend
    real, release = backend.compile, threading.Event()

    def held(params):
        release.wait(30)
        return real(params)

    backend.compile = held
    errors: dict[str, str] = {}

    def ask(field: str) -> None:
        try:
            m.compile(StructuredOutputsParams(regex=r"\bword", field_name=field))
        except ValueError as exc:
            errors[field] = str(exc)

    threads = [threading.Thread(target=ask, args=(f,)) for f in ("guided_regex", "response_format")]
    for t in threads:
        t.start()
    while m.cache_info()["pending"] == 0:
        threading.Event().wait(0.01)
    threading.Event().wait(0.2)  # the second request is waiting on the first one's compile
    release.set()
    for t in threads:
        t.join(30)
    assert errors["guided_regex"].startswith("guided_regex: ") and "Word boundary" in errors["guided_regex"]
    assert errors["response_format"].startswith("response_format: ") and "Word boundary" in errors["response_format"]
