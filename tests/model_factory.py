"""Builds tiny random-weight Hugging Face checkpoints for tests (safetensors + the SmolLM2 tokenizer).

``initializer_range=0.3`` keeps the random models from emitting one token forever, so greedy equality with
transformers actually compares something.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# Shared with the benchmarks, which must not import tests/: the packaged SmolLM2 GGUF and its tokenizer.
from llmctl_testkit.smollm2 import (  # noqa: E402
    SMOLLM2_FILE,
    load_test_tokenizer,
    make_truncated_smollm2,
    smollm2_gguf_path,
)

__all__ = ["SMOLLM2_FILE", "load_test_tokenizer", "make_eagle_head", "make_tiny_model", "make_truncated_smollm2",
           "smollm2_gguf_path"]


def _common(tok) -> dict:
    return dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )


def make_tiny_model(kind: str, out: Path, tok, **overrides) -> Path:
    import transformers as tf

    torch.manual_seed({"llama": 1, "mistral": 2, "qwen2": 3, "qwen3": 4}.get(kind, 5))
    cfg_kw = _common(tok)
    if kind == "llama":
        cfg_cls, model_cls = tf.LlamaConfig, tf.LlamaForCausalLM
        cfg_kw.update(tie_word_embeddings=False)
    elif kind == "llama_tied":
        cfg_cls, model_cls = tf.LlamaConfig, tf.LlamaForCausalLM
        cfg_kw.update(tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    elif kind == "mistral":
        cfg_cls, model_cls = tf.MistralConfig, tf.MistralForCausalLM
        cfg_kw.update(sliding_window=16, head_dim=16)
    elif kind == "qwen2":
        cfg_cls, model_cls = tf.Qwen2Config, tf.Qwen2ForCausalLM
        cfg_kw.update(tie_word_embeddings=True, use_sliding_window=False)
    elif kind == "qwen3":
        cfg_cls, model_cls = tf.Qwen3Config, tf.Qwen3ForCausalLM
        cfg_kw.update(head_dim=32, tie_word_embeddings=False, use_sliding_window=False)
    else:
        raise ValueError(kind)
    cfg_kw.update(overrides)
    config = cfg_cls(**cfg_kw)
    model = model_cls(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def make_eagle_head(target_dir: Path, out: Path, seed: int = 11, fc_bias: bool = True) -> Path:
    """A random-weight EAGLE-1 head for the Llama checkpoint in ``target_dir``, in the layout EAGLE checkpoints
    use: ``fc.weight`` (hidden x 2*hidden), ``fc.bias``, and one decoder layer's ``layers.0.*`` without its input
    norm; the token embedding and LM head are the target's."""
    import transformers as tf
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    cfg = tf.AutoConfig.from_pretrained(target_dir)
    cfg.num_hidden_layers = 1
    cfg.architectures = ["LlamaForCausalLM"]
    layer_model = tf.LlamaForCausalLM(cfg).eval()
    tensors = {k.removeprefix("model."): v.contiguous() for k, v in layer_model.state_dict().items()
               if k.startswith("model.layers.0.") and "input_layernorm" not in k}
    hidden = cfg.hidden_size
    tensors["fc.weight"] = torch.randn(hidden, 2 * hidden) * 0.1
    if fc_bias:
        tensors["fc.bias"] = torch.randn(hidden) * 0.1
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    cfg.save_pretrained(out)
    return out



def make_eagle3_head(target_dir: Path, out: Path, seed: int = 13, draft_vocab_size: int | None = None,
                     aux_layers: list[int] | None = None, own_embedding: bool = False) -> Path:
    """A random-weight EAGLE-3 head for the Llama checkpoint in ``target_dir``, in the published layout:
    ``fc.weight`` (hidden x 3*hidden), ``midlayer.*`` with q/k/v over 2*hidden inputs and a ``hidden_norm``,
    ``norm.weight``, ``lm_head.weight`` (draft_vocab x hidden) and ``d2t`` (each draft id's offset to its target
    id; with a smaller draft vocabulary, a random sorted subset of the target's ids)."""
    import transformers as tf
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    cfg = tf.AutoConfig.from_pretrained(target_dir)
    hidden, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head_dim
    draft_vocab = draft_vocab_size or vocab

    def rnd(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def norm() -> torch.Tensor:
        return 1.0 + rnd(hidden)

    tensors = {
        "fc.weight": rnd(hidden, 3 * hidden),
        "midlayer.input_layernorm.weight": norm(),
        "midlayer.hidden_norm.weight": norm(),
        "midlayer.self_attn.q_proj.weight": rnd(cfg.num_attention_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": rnd(kv, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": rnd(kv, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": rnd(hidden, cfg.num_attention_heads * head_dim),
        "midlayer.post_attention_layernorm.weight": norm(),
        "midlayer.mlp.gate_proj.weight": rnd(inter, hidden),
        "midlayer.mlp.up_proj.weight": rnd(inter, hidden),
        "midlayer.mlp.down_proj.weight": rnd(hidden, inter),
        "norm.weight": norm(),
        "lm_head.weight": rnd(draft_vocab, hidden, scale=1.0),
    }
    targets = torch.arange(vocab) if draft_vocab == vocab else \
        torch.randperm(vocab, generator=gen)[:draft_vocab].sort().values
    tensors["d2t"] = targets - torch.arange(draft_vocab)
    tensors["t2d"] = torch.zeros(vocab, dtype=torch.bool).index_fill(0, targets, True)
    if own_embedding:
        tensors["embed_tokens.weight"] = rnd(vocab, hidden, scale=1.0)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:1]
    cfg.num_hidden_layers = 1
    cfg.architectures = ["LlamaForCausalLMEagle3"]
    cfg.draft_vocab_size = draft_vocab
    if aux_layers is not None:
        cfg.eagle_aux_hidden_state_layer_ids = aux_layers
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    cfg.save_pretrained(out)
    return out


LLAVA_IMAGE_SIZE = 32
LLAVA_PATCH = 8


LLAVA_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]


def make_tiny_llava(out: Path, tok_dir: Path, seed: int = 7, kind: str = "llava") -> Path:
    """A random LLaVA-1.5-layout checkpoint: a 2-layer CLIP vision tower (32x32 images, 8x8 patches: 16 image
    tokens per image), the projector and a 2-layer Llama, saved with its processor (the SmolLM2 tokenizer plus an
    ``<image>`` token and a CLIP image processor, PIL-based), as transformers' ``save_pretrained`` writes it.
    ``kind="llava_next"``: LLaVA-NeXT with grid pinpoints of up to 3 tiles of 32 px per side (an image takes 36 to
    80-odd tokens, depending on its size)."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(tok_dir))  # a private copy: the token added below stays here
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=LLAVA_IMAGE_SIZE, patch_size=LLAVA_PATCH, projection_dim=16,
                                 initializer_range=0.3)
    text_kw = _common(tok)
    text_kw.update(vocab_size=len(tok), tie_word_embeddings=False)
    size = {"shortest_edge": LLAVA_IMAGE_SIZE}
    crop = {"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE}
    common = dict(vision_config=vision, text_config=tf.LlamaConfig(**text_kw), image_token_index=image_id,
                  initializer_range=0.3)
    proc_kw = dict(tokenizer=tok, patch_size=LLAVA_PATCH, vision_feature_select_strategy="default",
                   image_token="<image>", num_additional_image_tokens=1)
    if kind == "llava":
        model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(**common)).eval()
        processor = tf.LlavaProcessor(image_processor=tf.CLIPImageProcessor(size=size, crop_size=crop), **proc_kw)
    elif kind == "llava_siglip":  # a SigLIP tower (no class token), every feature kept, the last layer's
        common["vision_config"] = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, image_size=LLAVA_IMAGE_SIZE,
                                                        patch_size=LLAVA_PATCH)
        model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision_feature_select_strategy="full",
                                                                vision_feature_layer=-1, **common)).eval()
        proc_kw.update(vision_feature_select_strategy="full", num_additional_image_tokens=0)
        image_processor = tf.SiglipImageProcessor(size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE})
        processor = tf.LlavaProcessor(image_processor=image_processor, **proc_kw)
    elif kind == "llava_next":
        model = tf.LlavaNextForConditionalGeneration(
            tf.LlavaNextConfig(image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, **common)).eval()
        with torch.no_grad():
            model.model.image_newline.normal_(0.0, 0.3)
        image_processor = tf.LlavaNextImageProcessor(size=size, crop_size=crop,
                                                     image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
        processor = tf.LlavaNextProcessor(image_processor=image_processor, **proc_kw)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # the default init gives the projector tiny weights: make the image matter
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


QWEN2_VL_PATCH = 4
QWEN2_VL_MERGE = 2


def make_tiny_qwen2_vl(out: Path, tok_dir: Path, seed: int = 9, kind: str = "qwen2_vl") -> Path:
    """A random Qwen2-VL (``kind="qwen2_5_vl"``: Qwen2.5-VL) checkpoint: a 2-block vision tower over 4x4 patches
    with the 2x2 patch merger, and a 2-layer Qwen2 language model with M-RoPE (sections 2+3+3 of its 16 rotary
    frequencies), saved with its processor: the SmolLM2 tokenizer plus the vision tokens, and a PIL image
    processor whose pixel bounds give an image 4 to 36 tokens depending on its size."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(tok_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                          "<|video_pad|>"]})
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                      "<|video_pad|>")}
    torch.manual_seed(seed)
    text_kw = _common(tok)
    text_kw.update(vocab_size=len(tok), hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                   max_position_embeddings=512)
    vision_kw = dict(depth=2, hidden_size=64, num_heads=2, patch_size=QWEN2_VL_PATCH,
                     spatial_merge_size=QWEN2_VL_MERGE, temporal_patch_size=2, initializer_range=0.3)
    if kind == "qwen2_vl":
        vision = tf.Qwen2VLVisionConfig(embed_dim=32, mlp_ratio=2, **vision_kw)
        cfg = tf.Qwen2VLConfig(text_config=tf.Qwen2VLTextConfig(**text_kw), vision_config=vision,
                               image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                               vision_start_token_id=ids["<|vision_start|>"],
                               vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
        model = tf.Qwen2VLForConditionalGeneration(cfg).eval()
    elif kind == "qwen2_5_vl":
        # window attention: 16-px windows (2x2 merged units), every block but the last windowed
        vision = tf.Qwen2_5_VLVisionConfig(intermediate_size=64, out_hidden_size=64, window_size=16,
                                           fullatt_block_indexes=[1], **vision_kw)
        cfg = tf.Qwen2_5_VLConfig(text_config=tf.Qwen2_5_VLTextConfig(**text_kw), vision_config=vision,
                                  image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                                  vision_start_token_id=ids["<|vision_start|>"],
                                  vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
        model = tf.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    else:
        raise ValueError(kind)
    unit = QWEN2_VL_PATCH * QWEN2_VL_MERGE
    image_processor = tf.Qwen2VLImageProcessorPil(
        size={"shortest_edge": 4 * unit * unit, "longest_edge": 36 * unit * unit}, patch_size=QWEN2_VL_PATCH,
        merge_size=QWEN2_VL_MERGE, temporal_patch_size=2)
    model.save_pretrained(out, safe_serialization=True)
    image_processor.save_pretrained(out)  # transformers' joint processor would also want a video processor
    tok.save_pretrained(out)  # (torchvision); the engine needs only these two
    return out


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """transformers parses a GGUF's metadata in Python once per call (config, weights and tokenizer each call it)
    and rebuilds gguf's tensor-name map once per module; both are pure functions of their arguments, so while
    the oracle is converted they are cached: the same objects come back, sooner."""
    import functools

    import gguf as gguf_lib

    reader_cls, name_map = gguf_lib.GGUFReader, gguf_lib.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf_lib.GGUFReader, gguf_lib.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf_lib.GGUFReader, gguf_lib.get_tensor_name_map = reader_cls, name_map
