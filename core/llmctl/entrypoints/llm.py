"""Offline batch inference with vLLM's interface: ``LLM(model).generate(prompts, sampling_params)``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from llmctl.beam_search import (
    BeamSearchInstance,
    BeamSearchOutput,
    BeamSearchParams,
    check_beam_search,
    check_not_encoder_decoder,
    step_sampling_params,
)
from llmctl.config import EngineArgs
from llmctl.engine.input_processor import PromptType
from llmctl.engine.llm_engine import LLMEngine
from llmctl.lora.request import LoRARequest
from llmctl.multimodal.chat import split_chat_images
from llmctl.outputs import RequestOutput
from llmctl.pooling.outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    ScoringRequestOutput,
)
from llmctl.pooling.params import PoolingParams
from llmctl.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **engine_args: Any) -> None:
        engine_args.setdefault("usage_context", "llm_class")  # offline: platforms pick throughput defaults
        self.engine_args = EngineArgs.from_kwargs(model, **engine_args)
        self.llm_engine = LLMEngine(self.engine_args)

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.llm_engine.default_sampling_params()

    def get_stats(self) -> dict[str, Any]:
        return self.llm_engine.get_stats()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and
                                                 isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompt: expected a string, token ids, a dict or a list of them, got "
                             f"{type(prompts).__name__}")
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"sampling_params: got {len(params_list)} for {len(prompts)} prompts")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras: list[LoRARequest | None] = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"lora_request: got {len(loras)} for {len(prompts)} prompts")
        return self._run(prompts, params_list, use_tqdm, loras)

    # -- pooling models (runner="pooling"): llmctl.entrypoints.pooling ----------------------------------------------
    def encode(self, prompts: Any, pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
               use_tqdm: bool = False, truncate_prompt_tokens: int | None = None) -> list[PoolingRequestOutput]:
        """The pooled tensor per prompt, for the model's default task."""
        from llmctl.entrypoints import pooling

        items = pooling.as_prompt_list(prompts)
        task = self._pooling_task(pooling_params)
        params = pooling.params_for(len(items), pooling_params, task, truncate_prompt_tokens)
        return pooling.run_pooling(self.llm_engine, items, params, use_tqdm)

    def embed(self, prompts: Any, pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
              use_tqdm: bool = False, truncate_prompt_tokens: int | None = None) -> list[EmbeddingRequestOutput]:
        from llmctl.entrypoints import pooling

        items = pooling.as_prompt_list(prompts)
        params = pooling.params_for(len(items), pooling_params, "embed", truncate_prompt_tokens)
        return [EmbeddingRequestOutput.from_base(o) for o in pooling.run_pooling(self.llm_engine, items, params,
                                                                                  use_tqdm)]

    def classify(self, prompts: Any, pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
                 use_tqdm: bool = False, truncate_prompt_tokens: int | None = None
                 ) -> list[ClassificationRequestOutput]:
        from llmctl.entrypoints import pooling

        items = pooling.as_prompt_list(prompts)
        params = pooling.params_for(len(items), pooling_params, "classify", truncate_prompt_tokens)
        return [ClassificationRequestOutput.from_base(o) for o in pooling.run_pooling(self.llm_engine, items, params,
                                                                                       use_tqdm)]

    def score(self, data_1: Any, data_2: Any, truncate_prompt_tokens: int | None = None, use_tqdm: bool = False,
              pooling_params: PoolingParams | None = None) -> list[ScoringRequestOutput]:
        """Relevance of each ``data_2`` text to ``data_1`` (one query, or one per text): a cross-encoder's score,
        or the cosine similarity of an embedding model's vectors."""
        from llmctl.entrypoints import pooling

        return pooling.score(self.llm_engine, data_1, data_2, truncate_prompt_tokens, pooling_params, use_tqdm)

    def _pooling_task(self, pooling_params: Any) -> str:
        front = self.llm_engine.pooling
        if front is None:
            raise ValueError("runner: this model generates text; start it with runner='pooling' to pool")
        task = pooling_params.task if isinstance(pooling_params, PoolingParams) else None
        return task or front.default_task

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        if chat_template is None and not getattr(tok, "chat_template", None):
            raise ValueError("chat_template: this model's tokenizer has no chat template; pass chat_template=")
        prompts: list[PromptType] = []
        for conv in conversations:
            conv, images = split_chat_images(conv, self.llm_engine.multimodal)
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           chat_template=chat_template)
            prompt: dict[str, Any] = {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}
            if images:
                prompt["multi_modal_data"] = {"image": images}
            prompts.append(prompt)
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's ``LLM.beam_search``: the ``beam_width`` best sequences per prompt, best first (see
        llmctl.beam_search for the scoring). Each step runs every live beam as a one-token request; beams
        share their prefix through the prefix cache."""
        engine = self.llm_engine
        check_beam_search(params, self.engine_args.max_logprobs)
        check_not_encoder_decoder(engine)
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        processed = [engine.input_processor.tokenize(p) for p in prompts]
        for pp in processed:
            engine.input_processor.check(len(pp.prompt_token_ids), SamplingParams(max_tokens=params.max_tokens))
        instances = [BeamSearchInstance(pp.prompt_token_ids, params, engine.eos_token_ids,
                                        engine.model_config.max_model_len) for pp in processed]
        step_params = step_sampling_params(params)
        while True:
            work = [(inst, beam) for inst in instances for beam in inst.pending()]
            if not work:
                break
            outs = self._run([{"prompt_token_ids": beam.tokens} for _, beam in work], [step_params] * len(work),
                             use_tqdm)
            for inst in instances:
                tops = [out.outputs[0].logprobs[0] for (owner, _), out in zip(work, outs) if owner is inst]
                if tops:
                    inst.advance(tops)
        tok = self.get_tokenizer()
        results = []
        for inst in instances:
            seqs = inst.result()
            for seq in seqs:
                seq.text = tok.decode(seq.tokens, skip_special_tokens=True)
            results.append(BeamSearchOutput(seqs))
        return results

    def _run(self, prompts: list[PromptType], params_list: list[SamplingParams], use_tqdm: bool,
             loras: list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        engine = self.llm_engine
        ids: list[str] = []
        loras = loras or [None] * len(prompts)
        try:
            for prompt, params, lora in zip(prompts, params_list, loras):
                rid = engine.next_request_id()
                engine.add_request(rid, prompt, params, lora_request=lora)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)  # a bad prompt must not leave the good ones holding KV blocks
            raise
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True,
                       postfix={"output tok/s": 0.0})
        start = time.perf_counter()
        out_tokens = 0
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        out_tokens += sum(len(c.token_ids) for c in out.outputs)
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix({"output tok/s": round(out_tokens / (time.perf_counter() - start), 1)})
        except BaseException:
            engine.abort_request([i for i in ids if i not in finished])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[i] for i in ids]
