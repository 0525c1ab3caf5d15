"""One tensor-parallel rank that serves several quantized checkpoints in turn, so that one pair of processes covers
every method (not a test module): ``python -m tests.tp_quant_rank CASES_JSON OUT_JSON`` with ``RANK``,
``WORLD_SIZE`` and ``MASTER_ADDR`` set as torchrun would; each case names its model, its ``quantization``, a
``MASTER_PORT`` of its own and, optionally, ``tp`` and ``pp`` (two tensor-parallel ranks unless it says two pipeline
stages) and ``ep`` (``enable_expert_parallel``). A case that fails records its error and the next one runs."""

from __future__ import annotations

import json
import os
import sys

import torch

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):"]


def generate(llm) -> list[dict]:
    """Greedy tokens and their logprobs (few tokens: the point is the split, not the length)."""
    from llmctl import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=1, ignore_eos=True)
    result = []
    for out in llm.generate(PROMPTS, params, use_tqdm=False):
        comp = out.outputs[0]
        result.append({"tokens": list(comp.token_ids),
                       "logprobs": [lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids, strict=True)]})
    return result


def main() -> None:
    cases, out_path = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    torch.set_num_threads(1)
    from llmctl import LLM

    results: dict[str, dict] = {}
    for case in cases:
        os.environ["MASTER_PORT"] = str(case["port"])
        try:
            llm = LLM(case["model"], quantization=case["quantization"], dtype="float32",
                      tensor_parallel_size=case.get("tp", 2), pipeline_parallel_size=case.get("pp", 1),
                      distributed_executor_backend="external_launcher", num_threads=1, seed=0, max_model_len=128,
                      kv_cache_memory=8 << 20, enable_expert_parallel=case.get("ep", False))
            try:
                kernels = llm.llm_engine.core.model.quant_summary.describe()
                results[case["id"]] = {"outputs": generate(llm), "kernels": kernels}
            finally:
                llm.llm_engine.shutdown()
        except Exception as exc:  # recorded for the test to show; the other cases still run
            results[case["id"]] = {"error": f"{type(exc).__name__}: {exc}"}
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
