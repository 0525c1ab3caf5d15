"""``llmctl bench throughput`` with speculation on the copy workload: counts stay consistent and the timed
run's acceptance figures are reported."""

from __future__ import annotations

from llmctl import LLM
from llmctl.bench.copy_workload import copy_prompts
from llmctl.bench.throughput import run_throughput

from tests._engine_util import _single_thread  # noqa: F401


def test_copy_workload_with_ngram(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), kv_cache_memory=32 << 20, num_threads=1,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1})
    prompts = copy_prompts(llm.get_tokenizer(), 3, 40, seed=1)
    assert len(prompts) == 3 and len(set(prompts)) == 3 and all("Repeat the following code" in p for p in prompts)
    r = run_throughput(str(tiny_llama_dir), input_len=40, output_len=6, num_prompts=3, dataset="copy", llm=llm)
    assert r.output_tokens == r.expected_output_tokens == 18 and r.dataset.startswith("copy(")
    assert r.spec_acceptance_rate is not None and 0.0 <= r.spec_acceptance_rate <= 1.0
    plain = run_throughput(str(tiny_llama_dir), input_len=8, output_len=2, num_prompts=1,
                           llm=LLM(str(tiny_llama_dir), kv_cache_memory=32 << 20, num_threads=1))
    assert plain.spec_acceptance_rate is None
