"""Incremental detokenization of multi-byte UTF-8 and streamed deltas through AsyncLLM."""

from __future__ import annotations

import asyncio

import pytest
from llmctl import LLM, SamplingParams
from llmctl.engine.async_llm import AsyncLLM
from llmctl.engine.detokenizer import IncrementalDetokenizer

from tests._engine_util import _single_thread, assert_all_blocks_free  # noqa: F401

TEXTS = [
    "Ünïcödé façade, naïve café — déjà vu",
    "日本語のテキストと中文字符混合",
    "emoji 🎉🚀 family 👨‍👩‍👧 flags 🇫🇷 and ✓ marks",
    "mixed: Ελληνικά, русский, עברית, العربية, हिन्दी 한국어 🙂",
]


def feed(tokenizer, ids: list[int], params: SamplingParams, chunk: int = 1) -> tuple[IncrementalDetokenizer, list]:
    detok = IncrementalDetokenizer(tokenizer, params)
    seen = []
    for i in range(0, len(ids), chunk):
        matched = detok.add_tokens(ids[i:i + chunk])
        seen.append((detok.visible_text(False), matched))
        if matched is not None:
            break
    return detok, seen


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_token_by_token_equals_decode_and_no_partial_characters(test_tokenizer, text, chunk):
    ids = test_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.encode()) // 4  # multi-byte characters really are split over tokens
    detok, seen = feed(test_tokenizer, ids, SamplingParams(), chunk)
    detok.finalize()
    final = test_tokenizer.decode(ids)
    assert final == text
    assert detok.text == final
    for visible, _ in seen:
        assert "\ufffd" not in visible
        assert final.startswith(visible)
    # Some prefix decodes (by the plain tokenizer) end in half a character: the stream must have held those back.
    assert any("\ufffd" in test_tokenizer.decode(ids[:i]) for i in range(1, len(ids)))


def test_stop_string_with_multibyte_characters(test_tokenizer):
    text = TEXTS[1]
    ids = test_tokenizer.encode(text, add_special_tokens=False)
    detok, seen = feed(test_tokenizer, ids, SamplingParams(stop=["中文"]))
    assert seen[-1][1] == "中文"
    assert detok.visible_text(True) == text[:text.index("中文")]
    for visible, _ in seen:
        assert "中" not in visible and "\ufffd" not in visible


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", num_threads=1)


def test_engine_text_equals_decode_of_its_tokens(llm):
    tok = llm.get_tokenizer()
    # High-temperature samples from a random model hit plenty of byte-level pieces of multi-byte characters.
    outs = llm.generate(["é", "日本", "🎉"], SamplingParams(temperature=1.5, seed=3, max_tokens=48, ignore_eos=True),
                        use_tqdm=False)
    for out in outs:
        c = out.outputs[0]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_async_stream_deltas_concatenate_to_final_text(llm):
    tok = llm.get_tokenizer()
    engine = AsyncLLM(llm.engine_args, engine=llm.llm_engine)

    async def stream(prompt: str, seed: int) -> tuple[list[str], object]:
        deltas, previous, last = [], "", None
        async for out in engine.generate(prompt, SamplingParams(temperature=1.5, seed=seed, max_tokens=40,
                                                                ignore_eos=True), request_id=f"s{seed}"):
            text = out.outputs[0].text
            assert text.startswith(previous), "cumulative text must only grow"
            deltas.append(text[len(previous):])
            previous, last = text, out
        return deltas, last

    async def main():
        return await asyncio.gather(*(stream(p, s) for s, p in enumerate(["Ünï", "日本語", "emoji 🎉"])))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    for deltas, last in results:
        assert last.finished
        final = last.outputs[0].text
        assert "".join(deltas) == final
        assert final == tok.decode(last.outputs[0].token_ids, skip_special_tokens=True)
    assert_all_blocks_free(llm.get_stats())


@pytest.mark.parametrize("stop", [[], ["zz"]])
def test_finalize_flushes_an_incomplete_last_character(test_tokenizer, stop):
    """A sequence that ends (length/EOS) half-way through a character ends with the same text as decode(), with
    or without (unmatched) stop strings."""
    ids = test_tokenizer.encode("abc 日本語", add_special_tokens=False)
    cuts = [i for i in range(1, len(ids)) if test_tokenizer.decode(ids[:i]).endswith("\ufffd")]
    assert cuts
    for cut in cuts:
        detok, seen = feed(test_tokenizer, ids[:cut], SamplingParams(stop=stop))
        assert all("\ufffd" not in visible for visible, _ in seen)
        detok.finalize()
        assert detok.text == test_tokenizer.decode(ids[:cut])


def test_finalize_after_a_stop_string_adds_nothing(test_tokenizer):
    ids = test_tokenizer.encode("abc 日本語", add_special_tokens=False)
    detok, seen = feed(test_tokenizer, ids, SamplingParams(stop=["c 日"]))
    assert seen[-1][1] == "c 日"
    detok.finalize()
    assert detok.text == "ab"
