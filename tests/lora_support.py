"""PEFT adapters for the LoRA tests, and the reference they are held to: transformers with the adapter merged."""

from __future__ import annotations

from pathlib import Path

import torch

MAX_TOKENS = 8


def make_adapter(base_dir: Path, out: Path, rank: int, alpha: int, targets: list[str], rslora: bool,
                 seed: int) -> Path:
    """A PEFT adapter with random A and B (init_lora_weights=False, B scaled up so it changes greedy tokens)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return make_adapter_on(model, out, rank, alpha, targets, rslora, None)


def make_adapter_on(model, out: Path, rank: int, alpha: int, targets: list[str], rslora: bool,
                    seed: int | None) -> Path:
    """:func:`make_adapter` on a transformers model already built (a GGUF file's, which has no base directory);
    ``seed`` None keeps the caller's generator state."""
    import peft

    if seed is not None:
        torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                             init_lora_weights=False, lora_dropout=0.0)
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(4.0)
    wrapped.save_pretrained(out)
    return out


def merged_generate(base_dir: Path, adapter_dir: Path | None, prompts: list[list[int]],
                    max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """Greedy tokens of transformers with the adapter merged into the base weights (or the base model alone)."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    outs = []
    for prompt in prompts:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=0)
        outs.append(out[0, len(prompt):].tolist())
    return outs
