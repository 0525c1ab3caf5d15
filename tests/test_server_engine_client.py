"""The server's engine seam: ``AsyncLLM`` is an ``EngineClient``, and the server reads its limits from it."""

from __future__ import annotations

from llmctl import AsyncLLM, EngineArgs
from llmctl_server import ServerSettings, build_app
from llmctl_server.engine_client import EngineClient


def test_async_llm_is_the_servers_engine_client(tiny_llama_dir):
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(tiny_llama_dir), kv_cache_memory=16 << 20,
                                                  max_num_seqs=7, served_model_name="tiny-served"))
    try:
        assert isinstance(engine, EngineClient)
        assert engine.eos_token_ids == engine.engine.input_processor.eos_token_ids and engine.eos_token_ids
        state = build_app(engine, ServerSettings()).state.llmctl
        assert state.max_num_seqs == 7 and state.model_names == ["tiny-served"]
        assert state.max_model_len == engine.model_config.max_model_len and state.engine_alive()
    finally:
        engine.shutdown()
