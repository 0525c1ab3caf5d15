"""One tensor- or pipeline-parallel rank that runs several checkpoints in turn, for the family tests (not a test
module): ``python -m tests.tp_family_rank OUT_JSON PORTS RUN...`` with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` set
as torchrun would. Each ``RUN`` is ``TP:PP:MODEL``; ``PORTS`` holds one comma-separated port per run (each run's
group meets on its own), so the interpreter starts once for all of them. Results are keyed by ``RUN``. A model
ending in ``::ep`` runs with ``enable_expert_parallel``; the experts each rank loaded go under ``EXPERTS_KEY``,
keyed by ``RUN`` (they differ per rank)."""

from __future__ import annotations

import json
import os
import sys

import torch

from tests.tp_rank import generate

MAX_TOKENS = 6
SMALL_KV = 4 << 20  # bytes: enough blocks for these tiny models, quick to allocate
EP_SUFFIX = "::ep"
EXPERTS_KEY = "__experts__"


def loaded_experts(llm) -> list[dict]:
    """Per MoE layer: the experts this rank loaded and the shape of its gate/up stack (packed or not)."""
    layers = [m for m in llm.llm_engine.core.model.modules() if type(m).__name__ == "SparseMoE"]
    return [{"experts": sorted({int(k.split(".")[0]) for k in m._loaded}),
             "w13": list((m._packed[0] if m._packed is not None else m.w13).shape)} for m in layers]


def run_key(model: str, tp: int = 1, pp: int = 1) -> str:
    return f"{tp}:{pp}:{model}"


def main() -> None:
    out_path, ports, runs = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
    torch.set_num_threads(1)
    from llmctl import LLM

    results: dict[str, list[dict] | str] = {}
    experts: dict[str, list[dict]] = {}
    for run, port in zip(runs, ports, strict=True):
        tp, pp, model = run.split(":", 2)
        os.environ["MASTER_PORT"] = port
        ep = model.endswith(EP_SUFFIX)
        try:
            llm = LLM(model.removesuffix(EP_SUFFIX), dtype="float32", tensor_parallel_size=int(tp),
                      pipeline_parallel_size=int(pp), distributed_executor_backend="external_launcher",
                      num_threads=1, seed=0, max_model_len=128, kv_cache_memory=SMALL_KV, enable_expert_parallel=ep)
        except ValueError as exc:  # a refusal is a result too; the test says whether it was expected
            results[run] = f"ValueError: {exc}"
            continue
        results[run] = generate(llm, MAX_TOKENS)
        if ep:
            experts[run] = loaded_experts(llm)
        llm.llm_engine.shutdown()
    with open(out_path, "w") as f:
        json.dump({**results, EXPERTS_KEY: experts}, f)


if __name__ == "__main__":
    main()
