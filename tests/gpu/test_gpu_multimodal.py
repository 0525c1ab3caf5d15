"""LLaVA on a real GPU: start-up profiling with the vision tower in the peak, image prefill steps run eagerly and
decode steps replay graphs, and the greedy tokens equal transformers' on the same device. Skipped without a GPU;
run in its own process (``pytest tests/gpu -q``)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from llmctl import LLM, SamplingParams
from PIL import Image

from tests.gpu import REQUIRES_GPU
from tests.model_factory import make_tiny_llava

pytestmark = REQUIRES_GPU

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def test_llava_on_gpu_matches_transformers(model_cache_dir, test_tokenizer, caplog):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    path = make_tiny_llava(model_cache_dir / "gpu-llava-next", model_cache_dir / "smollm2-tokenizer",
                           kind="llava_next")
    with caplog.at_level(logging.INFO, logger="llmctl.engine.core"):
        llm = LLM(str(path), device="cuda", dtype="float32", max_model_len=256, max_num_seqs=4,
                  max_num_batched_tokens=64)
    assert "from profiling" in caplog.text
    images = [_image(0, (40, 50)), _image(1, (90, 30)), _image(2, (32, 32))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images], params,
                        use_tqdm=False)
    model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to("cuda").eval()
    processor = AutoProcessor.from_pretrained(path)
    for im, out in zip(images, outs):
        inputs = processor(text=PROMPT, images=im, return_tensors="pt").to("cuda")
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert list(out.outputs[0].token_ids) == ref[0, inputs["input_ids"].shape[1]:].tolist()
    stats = llm.get_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_qwen2_vl_on_gpu_matches_transformers(model_cache_dir, test_tokenizer):
    """Qwen2-VL: prefill chunks take [3, T] M-RoPE positions, and the decode steps replay captured graphs with
    each request's index shifted by its M-RoPE delta; a text-only prompt rides in the same batch."""
    from tests.model_factory import make_tiny_qwen2_vl
    from tests.test_multimodal_qwen2_vl import HF, PROMPT, TEXT_PROMPT

    path = make_tiny_qwen2_vl(model_cache_dir / "gpu-qwen2-vl", model_cache_dir / "smollm2-tokenizer")
    llm = LLM(str(path), device="cuda", dtype="float32", max_model_len=256, max_num_seqs=4,
              max_num_batched_tokens=64)
    assert llm.llm_engine.core.runner.decode_runner is not None
    images = [_image(0, (40, 50)), _image(1, (90, 30))]
    prompts = [{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images] + [{"prompt": TEXT_PROMPT}]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    hf = HF(path)
    hf.model.to("cuda")
    for p, out in zip(prompts, outs):
        imgs = [p["multi_modal_data"]["image"]] if "multi_modal_data" in p else []
        inputs = {k: v.to("cuda") for k, v in hf.inputs(p["prompt"], imgs).items()}
        with torch.no_grad():
            ref = hf.model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert list(out.outputs[0].token_ids) == ref[0, inputs["input_ids"].shape[1]:].tolist()
