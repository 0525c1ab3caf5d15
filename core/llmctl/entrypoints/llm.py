"""Offline batch inference with vLLM's interface: ``LLM(model).generate(prompts, sampling_params)``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from llmctl.config import EngineArgs
from llmctl.engine.input_processor import PromptType
from llmctl.engine.llm_engine import LLMEngine
from llmctl.lora.request import LoRARequest
from llmctl.outputs import RequestOutput
from llmctl.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **engine_args: Any) -> None:
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
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           chat_template=chat_template)
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

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
