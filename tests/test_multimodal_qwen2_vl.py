"""Qwen2-VL and Qwen2.5-VL: the engine's greedy tokens and logprobs equal transformers' in fp32, for images of
several sizes (dynamic resolution: the token count follows the size) batched with a text-only prompt, through
chunks that cut an image's run; the M-RoPE positions equal transformers' ``get_rope_index``; the prefix cache,
the encoder cache, preemption, token-id prompts and chat image parts keep them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llmctl import LLM, SamplingParams
from llmctl.engine.kv_sizing import profile_step
from PIL import Image

from tests.model_factory import make_tiny_qwen2_vl

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT = f"USER: {IMAGE}What is in the picture? ASSISTANT:"
TEXT_PROMPT = "USER: Tell me about the sea. ASSISTANT:"
MAX_TOKENS = 10
SMALL_KV = 8 << 20


def _image(seed: int, size: tuple[int, int] = (40, 50)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


def _dir(model_cache_dir, kind: str):
    path = model_cache_dir / kind
    if not (path / "config.json").exists():
        make_tiny_qwen2_vl(path, model_cache_dir / "smollm2-tokenizer", kind=kind)
    return path


@pytest.fixture(scope="module")
def qwen2_vl_dir(model_cache_dir, test_tokenizer):
    return _dir(model_cache_dir, "qwen2_vl")


class HF:
    """transformers' model with the inputs its joint processor would build (the image processor's patches and
    grids, each placeholder repeated to its image's token count, ``mm_token_type_ids``)."""

    def __init__(self, path, kind: str = "qwen2_vl") -> None:
        import transformers as tf

        cls = tf.Qwen2VLForConditionalGeneration if kind == "qwen2_vl" else tf.Qwen2_5_VLForConditionalGeneration
        self.model = cls.from_pretrained(path, dtype=torch.float32).eval()
        self.image_processor = tf.AutoImageProcessor.from_pretrained(path)
        self.tokenizer = tf.AutoTokenizer.from_pretrained(path)

    def inputs(self, prompt: str, images: list[Image.Image]) -> dict:
        kw: dict = {}
        if images:
            px = self.image_processor(images=images, return_tensors="pt")
            pieces = prompt.split("<|image_pad|>")
            assert len(pieces) == len(images) + 1
            prompt = pieces[0] + "".join("<|image_pad|>" * (int(g.prod()) // 4) + p
                                         for g, p in zip(px["image_grid_thw"], pieces[1:]))
            kw = dict(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        if images:
            kw["mm_token_type_ids"] = (ids == self.model.config.image_token_id).int()
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)

    def greedy(self, prompt: str, images: list[Image.Image], n: int = MAX_TOKENS) -> tuple[list[int], torch.Tensor]:
        inputs = self.inputs(prompt, images)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=n, do_sample=False, output_scores=True,
                                      return_dict_in_generate=True, pad_token_id=0)
        start = inputs["input_ids"].shape[1]
        scores = torch.stack(out.scores, dim=1)[0].float().log_softmax(-1)
        return out.sequences[0, start:].tolist(), scores


@pytest.fixture(scope="module")
def hf_qwen2_vl(qwen2_vl_dir):
    return HF(qwen2_vl_dir)


def _greedy(logprobs: int = 5) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=logprobs, ignore_eos=True)


def _assert_same(got, ref_tokens: list[int], ref_lp: torch.Tensor) -> None:
    assert got.token_ids == ref_tokens
    for pos, lp_dict in enumerate(got.logprobs):
        top_vals, top_ids = ref_lp[pos].topk(5)
        for tid, val in zip(top_ids.tolist(), top_vals.tolist()):
            assert tid in lp_dict, f"top-5 token {tid} missing at position {pos}"
            assert abs(lp_dict[tid].logprob - val) < 1e-3


def _llm(path, **kw) -> LLM:
    kw = {"dtype": "float32", "num_threads": 1, "kv_cache_memory": SMALL_KV, "block_size": 4, **kw}
    return LLM(str(path), **kw)


@pytest.mark.parametrize("chunk", [64, 16])
@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_vl_matches_transformers(request, kind, chunk, model_cache_dir, test_tokenizer):
    """Images of other sizes and aspect ratios get other grids and token counts; the text-only prompt in the same
    batch runs with plain positions. chunk=16: every image's run (from position 3) is cut by the first chunk."""
    path = _dir(model_cache_dir, kind)
    hf = request.getfixturevalue("hf_qwen2_vl") if kind == "qwen2_vl" else HF(path, kind)
    llm = _llm(path, max_num_batched_tokens=chunk, enable_prefix_caching=False)
    images = [_image(0), _image(1, (64, 30)), _image(2, (30, 100)), _image(3, (17, 17))]
    prompts = [{"prompt": PROMPT, "multi_modal_data": {"image": img}} for img in images]
    prompts.insert(2, {"prompt": TEXT_PROMPT})
    outs = llm.generate(prompts, _greedy(), use_tqdm=False)
    for p, out in zip(prompts, outs):
        imgs = [p["multi_modal_data"]["image"]] if "multi_modal_data" in p else []
        ref_tokens, ref_lp = hf.greedy(p["prompt"], imgs)
        _assert_same(out.outputs[0], ref_tokens, ref_lp)
    image_outs = [o for p, o in zip(prompts, outs) if "multi_modal_data" in p]
    assert len({len(o.prompt_token_ids) for o in image_outs}) > 2  # the token count follows the image's size
    assert image_outs[0].outputs[0].token_ids != image_outs[1].outputs[0].token_ids, "the image changes nothing"
    if kind == "qwen2_5_vl":  # the window attention is used: the grid spans more than one 2x2-unit window
        assert llm.llm_engine.core.model.visual.config.fullatt_block_indexes == [1]
    stats = llm.get_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_mrope_positions_equal_transformers(qwen2_vl_dir, hf_qwen2_vl):
    """Two images of different grids with text between and after them: the [3, L] positions and the delta equal
    transformers' ``get_rope_index``."""
    llm = _llm(qwen2_vl_dir, limit_mm_per_prompt={"image": 2})
    images = [_image(4, (64, 30)), _image(5, (30, 40))]
    prompt = f"USER: {IMAGE} and {IMAGE} Compare. ASSISTANT:"
    prepared = llm.llm_engine.prepare_request("x", {"prompt": prompt, "multi_modal_data": {"image": images}},
                                              _greedy())
    ids, features = prepared.prompt_token_ids, prepared.requests[0].mm_features
    got, delta = llm.llm_engine.core.model.mrope_positions(features, len(ids))
    inputs = hf_qwen2_vl.inputs(prompt, images)
    assert list(ids) == inputs["input_ids"][0].tolist()
    want, want_delta = hf_qwen2_vl.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                              image_grid_thw=inputs["image_grid_thw"])
    np.testing.assert_array_equal(got, want[:, 0].numpy())
    assert delta == int(want_delta) and delta < 0
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": images}}, _greedy(), use_tqdm=False)[0]
    _assert_same(out.outputs[0], *hf_qwen2_vl.greedy(prompt, images))


def test_plain_positions_would_not_match(qwen2_vl_dir, hf_qwen2_vl):
    """The control for the equality above: with M-RoPE off in the runner (every row the token's index) the
    same image gives other logprobs, so the tests compare the 3-D positions, not only the tower."""
    llm = _llm(qwen2_vl_dir)
    llm.llm_engine.core.runner.uses_mrope = False
    img = _image(6)
    out = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": img}}, _greedy(), use_tqdm=False)[0]
    ref_tokens, ref_lp = hf_qwen2_vl.greedy(PROMPT, [img])
    first = out.outputs[0].logprobs[0]
    tid = ref_tokens[0]
    assert tid not in first or abs(first[tid].logprob - ref_lp[0, tid].item()) > 1e-3


def test_prefix_and_encoder_cache_with_mrope(qwen2_vl_dir, hf_qwen2_vl):
    """The same prompt and image again hits the prefix cache past the image and resumes with the request's own
    M-RoPE positions; another image with the same token ids shares nothing from its first placeholder on."""
    llm = _llm(qwen2_vl_dir, max_num_batched_tokens=16)
    a, b = _image(7), _image(8)  # the same size: the same token ids
    first = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": a}}, _greedy(), use_tqdm=False)[0]
    other = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": b}}, _greedy(), use_tqdm=False)[0]
    again = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": a.copy()}}, _greedy(), use_tqdm=False)[0]
    assert first.prompt_token_ids == other.prompt_token_ids
    offset = first.prompt_token_ids.index(llm.llm_engine.core.model.image_token_id)
    assert other.num_cached_tokens == offset // 4 * 4  # the full blocks before the first placeholder
    assert again.num_cached_tokens >= 32
    for out, img in ((first, a), (other, b), (again, a)):
        _assert_same(out.outputs[0], *hf_qwen2_vl.greedy(PROMPT, [img]))
    cache = llm.llm_engine.core.runner.encoder_cache
    assert cache is not None and len(cache) == 2


def test_preemption_recomputes_with_mrope(qwen2_vl_dir, hf_qwen2_vl):
    """A KV cache too small for three image requests at once: preempted requests recompute their prompt and
    generated tokens with the same positions, and an n=2 request's siblings agree. Every decode step's fast path
    gives the positions the general path would."""
    block_bytes = 2 * 2 * 4 * 1 * 32 * 4  # layers x (k, v) x block_size x kv heads x head dim x fp32
    llm = _llm(qwen2_vl_dir, kv_cache_memory=30 * block_bytes, max_num_batched_tokens=16)
    runner = llm.llm_engine.core.runner
    general, decodes = runner._prepare_general, runner._prepare_decodes
    shifted = []

    def checked(sched):  # the decode fast path's [T] positions are the general path's three equal rows
        fast, ref = decodes(sched), general(sched)
        assert ref.positions.shape == (3, fast.positions.shape[0])
        assert all(torch.equal(row, fast.positions) for row in ref.positions)
        shifted.append(bool((fast.positions != fast.metadata.seq_lens - 1).any()))
        return fast

    runner._prepare_decodes = checked
    images = [_image(9), _image(10), _image(11)]
    try:
        outs = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": img}} for img in images], _greedy(),
                            use_tqdm=False)
    finally:
        del runner._prepare_decodes
    assert llm.llm_engine.core.scheduler.num_preemptions > 0
    assert shifted and all(shifted)  # every decode ran at its index plus a (negative) delta
    for img, out in zip(images, outs):
        _assert_same(out.outputs[0], *hf_qwen2_vl.greedy(PROMPT, [img]))
    two = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": images[0]}},
                       SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, n=2), use_tqdm=False)[0]
    assert [c.token_ids for c in two.outputs] == [outs[0].outputs[0].token_ids] * 2


def test_token_id_prompt_and_ngram_drafts(qwen2_vl_dir, hf_qwen2_vl):
    """A token-id prompt with one placeholder is expanded for the image's size (the server's path); n-gram drafts
    run at the shifted positions and are verified against transformers' tokens."""
    llm = _llm(qwen2_vl_dir, speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                 "prompt_lookup_max": 2, "prompt_lookup_min": 1})
    ids = llm.get_tokenizer()(PROMPT)["input_ids"]
    img = _image(12, (30, 100))
    out = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": img}}, _greedy(), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == len(ids) - 1 + llm.llm_engine.core.model.image_token_count((100, 30))
    _assert_same(out.outputs[0], *hf_qwen2_vl.greedy(PROMPT, [img]))


def test_offline_chat_wraps_each_image(qwen2_vl_dir, hf_qwen2_vl):
    """Chat image parts become vision start, placeholder, vision end straight before the message's text, as
    Qwen2-VL's template writes them."""
    import base64
    import io

    img = _image(13)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    llm = _llm(qwen2_vl_dir)
    out = llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "What is it?"}]}], _greedy(),
                   use_tqdm=False)[0]
    text = hf_qwen2_vl.tokenizer.apply_chat_template([{"role": "user", "content": f"{IMAGE}What is it?"}],
                                                     tokenize=False, add_generation_prompt=True)
    _assert_same(out.outputs[0], *hf_qwen2_vl.greedy(text, [img]))


def test_start_up_profiling_and_bad_input(qwen2_vl_dir, monkeypatch):
    """The profiling step encodes worst-case images (the processor's largest pixel bound); a wrong placeholder
    count and an image the resize cannot take are refused by name."""
    llm = _llm(qwen2_vl_dir, max_num_batched_tokens=64, max_num_seqs=2, limit_mm_per_prompt={"image": 3})
    core = llm.llm_engine.core
    model = core.model
    assert (model.min_pixels, model.max_pixels) == (4 * 64, 36 * 64)  # read from preprocessor_config.json
    size, per_image = model.largest_image()
    assert size == (48, 48) and per_image == 36
    seen = []
    original = model.embed_multimodal
    monkeypatch.setattr(model, "embed_multimodal", lambda feats: seen.append(feats) or original(feats))
    profile_step(core.model, core.attention, core.scheduler_config, core.args.block_size, core.kv_cache_dtype,
                 core.model.kv_cache_spec(), core.device, pooling=False,
                 limit_mm_per_prompt=core.args.limit_mm_per_prompt)()
    (features,) = seen
    assert len(features) == 3 and features[0].grid_thw == (1, 12, 12)
    with pytest.raises(ValueError, match=r"prompt: 0 image placeholder\(s\) \(<\|image_pad\|>\) for 1 image"):
        llm.generate({"prompt": "No placeholder", "multi_modal_data": {"image": _image(0)}}, _greedy(1),
                     use_tqdm=False)
    thin = _image(1, (500, 2))  # past the image processor's aspect-ratio limit of 200
    with pytest.raises(ValueError, match=r"multi_modal_data: the processor refused the input: absolute aspect"):
        llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": thin}}, _greedy(1), use_tqdm=False)
    ids = llm.get_tokenizer()(PROMPT)["input_ids"]
    with pytest.raises(ValueError, match=r"multi_modal_data: a 500x2 image: absolute aspect ratio"):
        llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": thin}}, _greedy(1), use_tqdm=False)


@pytest.mark.parametrize("layout", ["transformers5"])
def test_checkpoint_layouts_load_the_same(qwen2_vl_dir, tmp_path, layout):
    """transformers 5's in-memory names (``model.visual.*``, ``model.language_model.*``) load as the hub's; an
    unknown tensor is refused by name."""
    import shutil

    from safetensors.torch import load_file, save_file

    def rename(name: str) -> str:
        if name.startswith("visual."):
            return "model." + name
        if name.startswith("model."):
            return "model.language_model." + name[len("model."):]
        return name

    out = tmp_path / layout
    shutil.copytree(qwen2_vl_dir, out)
    tensors = load_file(str(qwen2_vl_dir / "model.safetensors"))
    save_file({rename(k): v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    prompt = {"prompt": PROMPT, "multi_modal_data": {"image": _image(14)}}
    ref = _llm(qwen2_vl_dir).generate(prompt, _greedy(1), use_tqdm=False)[0].outputs[0].token_ids
    assert _llm(out).generate(prompt, _greedy(1), use_tqdm=False)[0].outputs[0].token_ids == ref
    tensors["visual.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="visual.extra.weight has no place in the vision tower"):
        _llm(out)
