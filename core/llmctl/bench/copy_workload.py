"""A copy-heavy offline workload, where speculation by prompt lookup pays off: the model is asked to repeat a
slice of source code it is given (llmctl's own modules, so the text is the same wherever llmctl is
installed). Chat models get the request through their chat template; others get the text and continue it."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

COPY_DATASET = "copy"


def _source_files() -> list[Path]:
    import llmctl

    return sorted(p for p in Path(llmctl.__file__).parent.rglob("*.py") if p.stat().st_size > 2000)


def copy_prompts(tokenizer: Any, num_prompts: int, input_len: int, seed: int = 0) -> list[str]:
    """``num_prompts`` prompts, each holding about ``input_len`` tokens of source code to repeat."""
    files = _source_files()
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_prompts):
        ids = tokenizer.encode(files[rng.randrange(len(files))].read_text(encoding="utf-8"), add_special_tokens=False)
        start = rng.randrange(max(1, len(ids) - input_len))
        text = tokenizer.decode(ids[start:start + input_len])
        if getattr(tokenizer, "chat_template", None):
            msg = f"Repeat the following code exactly, with no comment before or after it:\n\n{text}"
            prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                                         add_generation_prompt=True))
        else:
            prompts.append(text + "\n\n# The same code again:\n\n" + text[: len(text) // 4])
    return prompts
