"""A tiny random Llama checkpoint with a word-level tokenizer, built offline in a second.

``initializer_range=0.3`` makes the logits spread wide enough that greedy decoding changes token from step to
step and near-ties are rare, so comparing two engines' greedy tokens compares the kernels, not noise. The
head size is 64 because that is what every real attention kernel supports.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<unk>", "<s>", "</s>"]
NUM_WORDS = 125  # vocab = 128 with the specials


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + [f"w{i}" for i in range(NUM_WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)
    return fast


def build_tiny_llama(out: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=256, initializer_range=0.3, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
        tie_word_embeddings=False, torch_dtype="float32",
    )
    LlamaForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    return out
