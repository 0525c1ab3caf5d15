#!/usr/bin/env python
"""Write W2, the realistic-size workload's checkpoint: Llama-3.2-1B-shaped, random bf16 weights.

16 layers, hidden 2048, 32 heads, 8 KV heads, intermediate 8192, vocabulary 128256, tied embeddings, Llama 3's
RoPE (theta 500000, llama3 scaling). Random weights are enough for throughput: every engine does the same work,
with EOS ignored. The weights follow transformers' initialisation (normal, ``initializer_range`` 0.02; norms 1),
drawn tensor by tensor from one seeded generator, so a rebuild is the same checkpoint byte for byte.

No tokenizer can be downloaded, so the directory gets a word-level one with one token per id (``t0`` ...
``t128255``): it decodes every id a random model can produce, and the benchmarks feed random token ids anyway.

    .venv/bin/python benchmarks/make_w2.py OUT_DIR            # about 2.5 GB
    .venv/bin/python benchmarks/make_w2.py OUT_DIR --num-layers 2 --vocab-size 4096   # a small one to try things

Tensors are written a shard at a time (``model.safetensors.index.json``), so memory stays near one shard.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

SHARD_BYTES = 1 << 30


@dataclass(frozen=True)
class W2Shape:
    num_layers: int = 16
    hidden_size: int = 2048
    num_heads: int = 32
    num_kv_heads: int = 8
    intermediate_size: int = 8192
    vocab_size: int = 128256
    max_position_embeddings: int = 131072


def config(shape: W2Shape) -> dict:
    """Llama-3.2-1B's config.json with the shape's sizes."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers, "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads, "head_dim": shape.hidden_size // shape.num_heads,
        "vocab_size": shape.vocab_size, "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True, "initializer_range": 0.02,
        "attention_bias": False, "mlp_bias": False, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None,
    }


def tensor_shapes(shape: W2Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint in file order (the LM head is the tied embedding)."""
    h, d = shape.hidden_size, shape.hidden_size // shape.num_heads
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab_size, h))]
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (shape.num_heads * d, h)),
                (p + "self_attn.k_proj.weight", (shape.num_kv_heads * d, h)),
                (p + "self_attn.v_proj.weight", (shape.num_kv_heads * d, h)),
                (p + "self_attn.o_proj.weight", (h, shape.num_heads * d)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (shape.intermediate_size, h)),
                (p + "mlp.up_proj.weight", (shape.intermediate_size, h)),
                (p + "mlp.down_proj.weight", (h, shape.intermediate_size))]
    return out + [("model.norm.weight", (h,))]


def write_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t0", "eos_token": "t1", "unk_token": "t2",
        "model_max_length": 131072}, indent=1))


def write(out: Path, shape: W2Shape, seed: int = 0) -> int:
    """Writes the checkpoint into ``out``; returns its parameter count."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, files, weight_map, total = 0, [], {}, 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, shard_bytes = {}, 0

    for name, dims in tensor_shapes(shape):
        if len(dims) == 1:
            t = torch.ones(dims, dtype=torch.bfloat16)
        else:
            t = torch.empty(dims, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(torch.bfloat16)
        shard[name] = t
        shard_bytes += t.numel() * t.element_size()
        total += t.numel()
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    # the shard names carry no total (it is not known while writing), which transformers accepts
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config(shape), indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    write_tokenizer(out, shape.vocab_size)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="directory to write (about 2.5 GB at the full shape)")
    defaults = W2Shape()
    for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
        ap.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    shape = W2Shape(num_layers=a.num_layers, hidden_size=a.hidden_size, num_heads=a.num_heads,
                    num_kv_heads=a.num_kv_heads, intermediate_size=a.intermediate_size, vocab_size=a.vocab_size)
    if shape.hidden_size % shape.num_heads or shape.num_heads % shape.num_kv_heads:
        ap.error(f"--hidden-size {shape.hidden_size} must split into --num-heads {shape.num_heads}, and those into "
                 f"--num-kv-heads {shape.num_kv_heads}")
    total = write(a.out, shape, a.seed)
    print(json.dumps({"out": str(a.out), "parameters": total, "bytes": 2 * total, "shape": shape.__dict__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
