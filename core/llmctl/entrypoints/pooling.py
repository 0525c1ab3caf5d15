"""The offline pooling API behind ``LLM.embed`` / ``classify`` / ``score`` / ``encode`` (vLLM's names and
output types). Everything runs through the engine's pooling requests; scoring with an embedding model is the
cosine similarity of the two embeddings, with a cross-encoder one forward pass per (query, document) pair."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from llmctl.engine.llm_engine import LLMEngine
from llmctl.pooling.outputs import PoolingOutput, PoolingRequestOutput, ScoringRequestOutput
from llmctl.pooling.params import PoolingParams


def as_prompt_list(prompts: Any, field: str = "prompts") -> list[Any]:
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"{field}: expected a string, token ids, a dict or a list of them, got "
                         f"{type(prompts).__name__}")
    return list(prompts)


def params_for(n: int, pooling_params: PoolingParams | Sequence[PoolingParams] | None, task: str,
               truncate_prompt_tokens: int | None) -> list[PoolingParams]:
    if pooling_params is None or isinstance(pooling_params, PoolingParams):
        base = pooling_params or PoolingParams()
        params = [base] * n
    else:
        params = list(pooling_params)
        if len(params) != n:
            raise ValueError(f"pooling_params: got {len(params)} for {n} prompts")
    changes: dict[str, Any] = {"task": task}
    if truncate_prompt_tokens is not None:
        changes["truncate_prompt_tokens"] = truncate_prompt_tokens
    return [p.clone(**changes) for p in params]


def run_pooling(engine: LLMEngine, prompts: list[Any], params: list[PoolingParams],
                use_tqdm: bool = False) -> list[PoolingRequestOutput]:
    ids: list[str] = []
    try:
        for prompt, p in zip(prompts, params, strict=True):
            rid = engine.next_request_id()
            engine.add_request(rid, prompt, p)
            ids.append(rid)
    except Exception:
        engine.abort_request(ids)  # a bad prompt must not leave the good ones holding KV blocks
        raise
    finished: dict[str, PoolingRequestOutput] = {}
    bar = None
    if use_tqdm:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if isinstance(out, PoolingRequestOutput) and out.finished:
                    finished[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
    except BaseException:
        engine.abort_request([i for i in ids if i not in finished])
        raise
    finally:
        if bar is not None:
            bar.close()
    failed = [finished[i] for i in ids if finished[i].error]
    if failed:
        raise RuntimeError(f"request {failed[0].request_id} failed: {failed[0].error}")
    return [finished[i] for i in ids]


def _texts(value: Any, field: str) -> list[Any]:
    if isinstance(value, (str, dict)):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, dict)) for v in value):
        return list(value)
    raise ValueError(f"{field}: expected a string or a non-empty list of strings")


def score(engine: LLMEngine, data_1: Any, data_2: Any, truncate_prompt_tokens: int | None,
          pooling_params: PoolingParams | None, use_tqdm: bool) -> list[ScoringRequestOutput]:
    """``data_1`` holds one query (paired with every document) or as many as ``data_2``."""
    front = engine.pooling
    if front is None:
        raise ValueError("runner: score needs a pooling model (runner='pooling')")
    first, second = _texts(data_1, "data_1"), _texts(data_2, "data_2")
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise ValueError(f"data_1: got {len(first)} texts for {len(second)} in data_2; give one, or one per text")
    if "score" not in front.tasks:
        raise ValueError(f"task: this model serves {', '.join(front.tasks)}, not score")
    if front.num_labels is not None:  # a cross-encoder: one forward pass per pair, the head gives the score
        if front.num_labels != 1:
            raise ValueError(f"task: score needs a cross-encoder with one output label; this model has "
                             f"{front.num_labels}")
        prompts = [pair_prompt(engine, q, d, truncate_prompt_tokens) for q, d in zip(first, second, strict=True)]
        outs = run_pooling(engine, prompts, params_for(len(prompts), pooling_params, "score", truncate_prompt_tokens),
                           use_tqdm)
        return [ScoringRequestOutput.from_base(o) for o in outs]
    unique = list(dict.fromkeys(_key(t) for t in first + second))
    texts = {_key(t): t for t in first + second}
    embedded = run_pooling(engine, [texts[k] for k in unique],
                           params_for(len(unique), pooling_params, "embed", truncate_prompt_tokens), use_tqdm)
    by_key = dict(zip(unique, embedded, strict=True))
    results = []
    for i, (q, d) in enumerate(zip(first, second, strict=True)):
        a, b = by_key[_key(q)], by_key[_key(d)]
        sim = torch.nn.functional.cosine_similarity(a.outputs.data.float(), b.outputs.data.float(), dim=0)
        base = PoolingRequestOutput(f"score-{i}", PoolingOutput(sim.reshape(1)),
                                    a.prompt_token_ids + b.prompt_token_ids)
        results.append(ScoringRequestOutput.from_base(base))
    return results


def _key(text: Any) -> Any:
    return text if isinstance(text, str) else repr(sorted(text.items()))


def pair_prompt(engine: LLMEngine, query: Any, document: Any, truncate_prompt_tokens: int | None) -> dict[str, Any]:
    """A cross-encoder's input: both texts in one sequence (``[CLS] q [SEP] d [SEP]``), with segment ids."""
    if not isinstance(query, str) or not isinstance(document, str):
        raise ValueError("data_1: a cross-encoder scores text pairs; pass strings")
    if not query or not document:
        raise ValueError("data_1: query and document must not be empty")
    limit = truncate_prompt_tokens
    if limit == -1:
        limit = engine.model_config.max_model_len
    kw = {"truncation": True, "max_length": limit} if limit is not None else {}
    enc = engine.tokenizer(query, document, **kw)
    prompt: dict[str, Any] = {"prompt_token_ids": list(enc["input_ids"])}
    if "token_type_ids" in enc:
        prompt["token_type_ids"] = list(enc["token_type_ids"])
    return prompt
