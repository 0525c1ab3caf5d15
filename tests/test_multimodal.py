"""Image input (LLaVA-1.5 layout): the engine's greedy tokens and logprobs equal transformers' in fp32, through
chunked prefill that cuts an image's placeholder run, and the prefix cache never mixes up two images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llmctl import LLM, SamplingParams
from llmctl.engine.kv_sizing import profile_step
from PIL import Image

from tests.model_factory import make_tiny_llava

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
MAX_TOKENS = 10
SMALL_KV = 8 << 20


def _image(seed: int, size: tuple[int, int] = (40, 50)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def llava_dir(model_cache_dir, test_tokenizer):
    return make_tiny_llava(model_cache_dir / "llava", model_cache_dir / "smollm2-tokenizer")


@pytest.fixture(scope="module")
def hf_llava(llava_dir):
    return _hf(llava_dir, "llava")


def _hf(path, kind: str):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    cls = LlavaNextForConditionalGeneration if kind == "llava_next" else LlavaForConditionalGeneration
    return cls.from_pretrained(path, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def llava_next_dir(model_cache_dir, test_tokenizer):
    return make_tiny_llava(model_cache_dir / "llava-next", model_cache_dir / "smollm2-tokenizer", kind="llava_next")


def hf_greedy(hf_llava, prompt: str, image: Image.Image, n: int) -> tuple[list[int], torch.Tensor]:
    model, processor = hf_llava
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
    start = inputs["input_ids"].shape[1]
    scores = torch.stack(out.scores, dim=1)[0].float().log_softmax(-1)
    return out.sequences[0, start:].tolist(), scores


def _greedy(logprobs: int = 5) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=logprobs, ignore_eos=True)


def _assert_same(got, ref_tokens: list[int], ref_lp: torch.Tensor) -> None:
    assert got.token_ids == ref_tokens[:len(got.token_ids)]
    assert len(got.token_ids) == len(ref_tokens)
    for pos, lp_dict in enumerate(got.logprobs):
        top_vals, top_ids = ref_lp[pos].topk(5)
        for tid, val in zip(top_ids.tolist(), top_vals.tolist()):
            assert tid in lp_dict, f"top-5 token {tid} missing at position {pos}"
            assert abs(lp_dict[tid].logprob - val) < 1e-3


@pytest.mark.parametrize("chunk", [64, 16])
@pytest.mark.parametrize("kind", ["llava", "llava_next", "llava_siglip"])
def test_llava_matches_transformers(request, kind, chunk, model_cache_dir, test_tokenizer):
    """chunk=16: every prompt's placeholder run (from position 3) is cut by the first 16-token chunk. LLaVA-NeXT's
    images of other sizes and aspect ratios get other tile grids and token counts."""
    if kind == "llava_siglip":
        path = model_cache_dir / kind
        if not path.exists():
            make_tiny_llava(path, model_cache_dir / "smollm2-tokenizer", kind=kind)
    else:
        path = request.getfixturevalue("llava_dir" if kind == "llava" else "llava_next_dir")
    hf = request.getfixturevalue("hf_llava") if kind == "llava" else _hf(path, kind)
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=chunk, num_threads=1, kv_cache_memory=SMALL_KV,
              block_size=4, enable_prefix_caching=False)
    tower = llm.llm_engine.core.model.vision_tower
    # features come from the second-to-last of 2 layers (SigLIP: the last), so the last CLIP layer is dropped
    assert len(getattr(tower, "vision_model", tower).encoder.layers) == (2 if kind == "llava_siglip" else 1)
    images = [_image(0), _image(1, (64, 30)), _image(2, (30, 100)), _image(3, (32, 32))]
    outs = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": img}} for img in images], _greedy(),
                        use_tqdm=False)
    for img, out in zip(images, outs):
        ref_tokens, ref_lp = hf_greedy(hf, PROMPT, img, MAX_TOKENS)
        _assert_same(out.outputs[0], ref_tokens, ref_lp)
    if kind == "llava_next":
        assert len({len(o.prompt_token_ids) for o in outs}) > 2  # the token count follows the image's size
        tok = llm.get_tokenizer()
        ids = tok(PROMPT)["input_ids"]  # one placeholder, expanded by the engine for this image's size
        one = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": images[2]}}, _greedy(),
                           use_tqdm=False)[0]
        assert one.prompt_token_ids == outs[2].prompt_token_ids
        assert one.outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids, "the image does not change the output"
    stats = llm.get_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_prefix_cache_keys_on_the_image(llava_dir, hf_llava):
    """Same prompt ids, another image: only the blocks before the placeholders are shared; the same image again:
    a hit past the image, with the same tokens as without a cache."""
    llm = LLM(str(llava_dir), dtype="float32", max_num_batched_tokens=16, num_threads=1, kv_cache_memory=SMALL_KV,
              block_size=4)
    a, b = _image(2), _image(3)
    first = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": a}}, _greedy(), use_tqdm=False)[0]
    other = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": b}}, _greedy(), use_tqdm=False)[0]
    again = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": a.copy()}}, _greedy(),
                         use_tqdm=False)[0]
    # positions 0-2 are text, the image fills 3-18: only block 0 (positions 0-3) would match by token ids, and it
    # holds the image's first placeholder, so nothing may be shared
    assert other.num_cached_tokens == 0
    assert again.num_cached_tokens >= 20
    for out, img in ((first, a), (other, b), (again, a)):
        ref_tokens, ref_lp = hf_greedy(hf_llava, PROMPT, img, MAX_TOKENS)
        _assert_same(out.outputs[0], ref_tokens, ref_lp)
    assert first.outputs[0].token_ids != other.outputs[0].token_ids
    cache = llm.llm_engine.core.runner.encoder_cache
    assert cache is not None and cache.hits >= 1 and len(cache) == 2


def test_token_id_prompt_with_one_placeholder_is_expanded(llava_dir, hf_llava):
    llm = LLM(str(llava_dir), dtype="float32", num_threads=1, kv_cache_memory=SMALL_KV)
    tok = llm.get_tokenizer()
    ids = tok(PROMPT)["input_ids"]
    assert ids.count(llm.llm_engine.multimodal.image_token_id) == 1
    img = _image(4)
    out = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": img}}, _greedy(),
                       use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == len(ids) + 15
    ref_tokens, ref_lp = hf_greedy(hf_llava, PROMPT, img, MAX_TOKENS)
    _assert_same(out.outputs[0], ref_tokens, ref_lp)


def test_two_images_need_the_limit(llava_dir):
    llm = LLM(str(llava_dir), dtype="float32", num_threads=1, kv_cache_memory=SMALL_KV,
              limit_mm_per_prompt={"image": 2})
    two = "USER: <image> and <image>\nCompare. ASSISTANT:"
    out = llm.generate({"prompt": two, "multi_modal_data": {"image": [_image(5), _image(6)]}}, _greedy(1),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == MAX_TOKENS
    with pytest.raises(ValueError, match=r"multi_modal_data.image: 3 images, more than limit_mm_per_prompt"):
        llm.generate({"prompt": two, "multi_modal_data": {"image": [_image(5)] * 3}}, _greedy(1), use_tqdm=False)


@pytest.mark.parametrize("mm, match", [
    ({"image": "not an image"}, r"multi_modal_data.image\[0\]: expected a PIL image"),
    ({"video": []}, r"multi_modal_data: unsupported modality 'video'"),
    ({"image": [_image(7), _image(8)]}, r"limit_mm_per_prompt allows \(1\)"),
])
def test_bad_multi_modal_data(llava_dir, mm, match):
    llm = LLM(str(llava_dir), dtype="float32", num_threads=1, kv_cache_memory=SMALL_KV)
    with pytest.raises(ValueError, match=match):
        llm.generate({"prompt": PROMPT, "multi_modal_data": mm}, _greedy(1), use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompt: 0 image placeholder\(s\) \(<image>\) for 1 image"):
        llm.generate({"prompt": "No placeholder here", "multi_modal_data": {"image": _image(9)}}, _greedy(1),
                     use_tqdm=False)


def test_text_model_refuses_images(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", num_threads=1, kv_cache_memory=SMALL_KV)
    with pytest.raises(ValueError, match="multi_modal_data: model .* does not take images"):
        llm.generate({"prompt": "Hi", "multi_modal_data": {"image": _image(0)}}, _greedy(1), use_tqdm=False)


def test_preemption_and_n_siblings_keep_the_images(llava_dir, hf_llava):
    """A KV cache of 13 blocks for three 10-block requests: requests are preempted and recomputed (their images
    come back from the encoder cache), and an n=2 request's siblings share the image's blocks."""
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # layers x (k, v) x block_size x kv heads x head dim x fp32
    llm = LLM(str(llava_dir), dtype="float32", num_threads=1, block_size=4, kv_cache_memory=13 * block_bytes,
              max_num_batched_tokens=16)
    images = [_image(10), _image(11), _image(12)]
    outs = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": img}} for img in images], _greedy(),
                        use_tqdm=False)
    assert llm.llm_engine.core.scheduler.num_preemptions > 0
    for img, out in zip(images, outs):
        ref_tokens, ref_lp = hf_greedy(hf_llava, PROMPT, img, MAX_TOKENS)
        _assert_same(out.outputs[0], ref_tokens, ref_lp)
    two = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": images[0]}},
                       SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, n=2), use_tqdm=False)[0]
    assert [c.token_ids for c in two.outputs] == [outs[0].outputs[0].token_ids] * 2
    stats = llm.get_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_speculative_decoding(llava_dir, tiny_llama_dir, hf_llava):
    """n-gram drafts are verified against the image-conditioned logits: tokens stay transformers'. Draft models
    and EAGLE heads would propose without the image, and are refused."""
    llm = LLM(str(llava_dir), dtype="float32", num_threads=1, kv_cache_memory=SMALL_KV,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2,
                                  "prompt_lookup_min": 1})
    img = _image(13)
    out = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": img}}, _greedy(), use_tqdm=False)[0]
    ref_tokens, ref_lp = hf_greedy(hf_llava, PROMPT, img, MAX_TOKENS)
    _assert_same(out.outputs[0], ref_tokens, ref_lp)
    del llm
    with pytest.raises(ValueError, match="speculative_config: method 'draft_model' .* use method 'ngram'"):
        LLM(str(llava_dir), dtype="float32", num_threads=1, kv_cache_memory=SMALL_KV,
            speculative_config={"method": "draft_model", "model": str(tiny_llama_dir), "num_speculative_tokens": 2})


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_checkpoint_layouts_load_the_same(llava_dir, tmp_path, layout):
    """The hub's llava-hf layout (``vision_tower.vision_model.*``) and transformers 5's (``model.*`` + ``lm_head``)
    load into the same model; an unknown tensor is refused by name."""
    import shutil

    from safetensors.torch import load_file, save_file

    def rename(name: str) -> str:
        if layout == "hub":
            return name.replace("vision_tower.", "vision_tower.vision_model.", 1) if name.startswith("vision_tower.") \
                else name
        if name.startswith("language_model.model."):
            return "model.language_model." + name[len("language_model.model."):]
        if name.startswith("language_model.lm_head."):
            return name[len("language_model."):]
        return "model." + name

    out = tmp_path / layout
    shutil.copytree(llava_dir, out)
    tensors = load_file(str(llava_dir / "model.safetensors"))
    save_file({rename(k): v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    img = _image(14)
    prompt = {"prompt": PROMPT, "multi_modal_data": {"image": img}}
    ref = LLM(str(llava_dir), dtype="float32", num_threads=1, kv_cache_memory=SMALL_KV).generate(
        prompt, _greedy(1), use_tqdm=False)[0].outputs[0].token_ids
    got = LLM(str(out), dtype="float32", num_threads=1, kv_cache_memory=SMALL_KV).generate(
        prompt, _greedy(1), use_tqdm=False)[0].outputs[0].token_ids
    assert got == ref
    tensors["vision_tower.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="vision_tower.extra.weight has no place in the vision tower"):
        LLM(str(out), dtype="float32", num_threads=1, kv_cache_memory=SMALL_KV)


def test_offline_chat_with_image_parts(llava_dir, hf_llava, tiny_llama_dir):
    import base64
    import io

    img = _image(15)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    llm = LLM(str(llava_dir), dtype="float32", num_threads=1, kv_cache_memory=SMALL_KV)
    outs = [llm.chat([{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}], _greedy(),
                     use_tqdm=False)[0] for part in ({"type": "image_url", "image_url": {"url": url}},
                                                    {"type": "image_pil", "image_pil": img})]
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "<image>\nWhat is it?"}], tokenize=False,
                                   add_generation_prompt=True)
    ref_tokens, ref_lp = hf_greedy(hf_llava, text, img, MAX_TOKENS)
    for out in outs:
        _assert_same(out.outputs[0], ref_tokens, ref_lp)
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\].image_url: offline chat takes data: URLs"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
                 use_tqdm=False)
    del llm
    text_llm = LLM(str(tiny_llama_dir), dtype="float32", num_threads=1, kv_cache_memory=SMALL_KV)
    with pytest.raises(ValueError, match=r"messages\[0\].content: this model does not take images"):
        text_llm.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": img}]}], use_tqdm=False)


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_start_up_profiling_step_encodes_worst_case_images(request, kind, monkeypatch):
    """The step a GPU platform measures at start-up (run here on the CPU) runs the vision tower on as many
    worst-case images as a step can touch, and the language model on their rows."""
    path = request.getfixturevalue("llava_dir" if kind == "llava" else "llava_next_dir")
    llm = LLM(str(path), dtype="float32", num_threads=1, kv_cache_memory=SMALL_KV, max_num_batched_tokens=64,
              max_num_seqs=2, limit_mm_per_prompt={"image": 3})
    core = llm.llm_engine.core
    seen = []
    original = core.model.embed_multimodal
    monkeypatch.setattr(core.model, "embed_multimodal", lambda feats: seen.append(feats) or original(feats))
    profile_step(core.model, core.attention, core.scheduler_config, core.args.block_size, core.kv_cache_dtype,
                 core.model.kv_cache_spec(), core.device, pooling=False,
                 limit_mm_per_prompt=core.args.limit_mm_per_prompt)()
    (features,) = seen
    size, per_image = core.model.largest_image()
    assert len(features) == min(-(-64 // per_image) + 1, 3)  # one 64-token sequence, up to 3 images each
    if kind == "llava_next":
        assert size == (64, 64) and features[0].pixel_values.shape[0] == 5  # the 2x2 pinpoint, plus the base


def test_prefix_hit_that_ends_inside_an_image(llava_dir, hf_llava):
    """A request computes the first 8 positions (the text before the image and its first 5 placeholders) and is
    aborted; its full blocks stay in the prefix cache. The same prompt and image again adopts them and starts its
    computation inside the image's run, from row 5 of the image's encoder output."""
    llm = LLM(str(llava_dir), dtype="float32", num_threads=1, kv_cache_memory=SMALL_KV, block_size=4,
              max_num_batched_tokens=8)
    engine = llm.llm_engine
    img = _image(16)
    prompt = {"prompt": PROMPT, "multi_modal_data": {"image": img}}
    engine.add_request("first", prompt, _greedy())
    engine.step()
    engine.abort_request("first")
    engine.add_request("second", prompt, _greedy())
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    assert final is not None and final.num_cached_tokens == 8  # two blocks, the second ending inside the image
    ref_tokens, ref_lp = hf_greedy(hf_llava, PROMPT, img, MAX_TOKENS)
    _assert_same(final.outputs[0], ref_tokens, ref_lp)
