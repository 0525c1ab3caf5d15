"""One tensor-parallel rank that runs several checkpoints in turn, for the family tests (not a test module):
``python -m tests.tp_family_rank OUT_JSON TP PORTS MODEL...`` with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` set as
torchrun would; ``PORTS`` holds one comma-separated port per model (each model's group meets on its own), so the
interpreter starts once for all of them."""

from __future__ import annotations

import json
import os
import sys

import torch

from tests.tp_rank import generate

MAX_TOKENS = 6
SMALL_KV = 4 << 20  # bytes: enough blocks for these tiny models, quick to allocate


def main() -> None:
    out_path, tp, ports, models = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4:]
    torch.set_num_threads(1)
    from llmctl import LLM

    results: dict[str, list[dict] | str] = {}
    for model, port in zip(models, ports, strict=True):
        os.environ["MASTER_PORT"] = port
        try:
            llm = LLM(model, dtype="float32", tensor_parallel_size=tp, distributed_executor_backend="external_launcher",
                      num_threads=1, seed=0, max_model_len=128, kv_cache_memory=SMALL_KV)
        except ValueError as exc:  # a refusal is a result too; the test says whether it was expected
            results[model] = f"ValueError: {exc}"
            continue
        results[model] = generate(llm, MAX_TOKENS)
        llm.llm_engine.shutdown()
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
