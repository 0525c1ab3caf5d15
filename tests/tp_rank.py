"""One tensor- or pipeline-parallel rank for the external-launcher tests (not a test module): ``python -m
tests.tp_rank MODEL OUT_JSON TP [PP]`` with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set, as
torchrun would."""

from __future__ import annotations

import json
import sys

import torch

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):"]


def generate(llm, max_tokens: int = 12) -> list[dict]:
    from llmctl import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=2, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    result = []
    for out in outs:
        comp = out.outputs[0]
        result.append({"tokens": list(comp.token_ids),
                       "logprobs": [lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids, strict=True)]})
    return result


def main() -> None:
    model, out_path, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pp = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    torch.set_num_threads(1)
    from llmctl import LLM

    llm = LLM(model, dtype="float32", tensor_parallel_size=tp, pipeline_parallel_size=pp,
              distributed_executor_backend="external_launcher", num_threads=1, seed=0)
    with open(out_path, "w") as f:
        json.dump(generate(llm), f)
    llm.llm_engine.shutdown()


if __name__ == "__main__":
    main()
