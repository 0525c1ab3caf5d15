"""Speculative decoding: greedy output identical to decoding without speculation (n-gram proposer and an
oracle proposer whose drafts are partly wrong, through preemption, prefix caching, n > 1, stops and aborts),
sampled output distributed as the target's (rejection sampler against the plain sampler's distribution, and
the engine's histograms with and without speculation), every KV block back after each run, and bad configs
refused naming the field."""

from __future__ import annotations

import collections

import pytest
import torch
from llmctl import LLM, SamplingParams
from llmctl.engine.request import Request
from llmctl.engine.sampler import Sampler
from llmctl.ops import Ops
from llmctl.spec_decode.config import SpeculativeConfig
from llmctl.spec_decode.ngram_proposer import NgramProposer
from llmctl.spec_decode.rejection_sampler import RejectionSampler

from tests._engine_util import _single_thread, assert_all_blocks_free  # noqa: F401
from tests.test_engine_scheduling import bytes_per_block
from tests.test_sampler import chi2_pvalue, reference_probs

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
COPY_PROMPTS = [
    "one two three four five six seven eight one two three four five six seven eight one two three",
    "def f(x):\n    return x + 1\n\ndef g(x):\n    return x + 1\n\ndef h(x):\n    return",
    "Hello, my name is",
    "alpha beta gamma alpha beta gamma alpha beta",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def make_llm(model_dir, spec=None, blocks=256, **kw) -> LLM:
    return LLM(str(model_dir), dtype="float32", num_threads=1, kv_cache_memory=blocks * bytes_per_block(model_dir),
               speculative_config=spec, **kw)


class OracleProposer:
    """Drafts the reference continuation with every third draft wrong, so steps accept some drafts, reject
    others, and sometimes take the bonus token."""

    def __init__(self, references: list[list[int]], vocab: int) -> None:
        self.references = references
        self.vocab = vocab
        self.calls = 0

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        self.calls += 1
        for ref in self.references:
            if ref[:len(token_ids)] == token_ids:
                draft = ref[len(token_ids):len(token_ids) + k]
                j = self.calls % 3
                if j < len(draft):
                    draft[j] = (draft[j] + 1) % self.vocab
                return draft
        return []


@pytest.fixture(scope="module")
def small_vocab_dir(model_cache_dir, test_tokenizer):
    """A tiny Llama over the first 64 token ids: its random continuations reuse earlier tokens often enough for
    prompt lookup to propose drafts, and its distributions are small enough to histogram."""
    from tests.model_factory import make_tiny_model

    return make_tiny_model("llama", model_cache_dir / "llama-vocab64", test_tokenizer, vocab_size=64,
                           bos_token_id=1, eos_token_id=2, pad_token_id=2)


@pytest.fixture(scope="module")
def plain(tiny_llama_dir):
    return make_llm(tiny_llama_dir)


@pytest.fixture(scope="module")
def ngram_llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir, NGRAM)


@pytest.fixture(scope="module")
def small_plain(small_vocab_dir):
    return make_llm(small_vocab_dir)


SMALL_PROMPTS = [[(7 * i + 3 * j) % 60 + 3 for j in range(5 + 4 * i)] for i in range(6)]


def full_ids(out) -> list[int]:
    return list(out.prompt_token_ids) + list(out.outputs[0].token_ids)


# -- configuration -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, field", [
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 17}, "num_speculative_tokens"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "medusa", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "lookahead"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 1}, "disable_by_batch_size"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": "8"}, "disable_by_batch_size"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "model"),
    ({"method": "eagle3", "num_speculative_tokens": 2}, "model"),
    ("{not json", "speculative_config"),
])
def test_bad_config_names_the_field(cfg, field):
    with pytest.raises(ValueError, match=f"speculative_config(\\.{field})?:" if field != "speculative_config"
                       else "speculative_config:"):
        SpeculativeConfig.parse(cfg)


def test_config_defaults_and_json():
    cfg = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}')
    assert (cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (3, 4, 4)


def test_ngram_proposer_against_a_direct_search():
    prop = NgramProposer(1, 3)
    seq = [5, 6, 7, 8, 1, 5, 6, 7, 9, 2, 5, 6, 7]
    # Longest suffix first: [5, 6, 7] last occurred at index 5, followed by 9, 2.
    assert prop.propose(seq, 2) == [9, 2]
    assert prop.propose(seq, 10) == [9, 2, 5, 6, 7]
    assert prop.propose([1, 2, 3], 2) == []
    assert NgramProposer(2, 2).propose([4, 1, 4, 2, 4], 3) == []
    assert NgramProposer(1, 1).propose([4, 1, 4, 2, 4], 3) == [2, 4]


# -- greedy equality -----------------------------------------------------------------------------------------------
def test_ngram_greedy_identical(small_vocab_dir, small_plain, plain, ngram_llm):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, detokenize=False)
    spec = make_llm(small_vocab_dir, NGRAM)
    ref = small_plain.generate(SMALL_PROMPTS, params, use_tqdm=False)
    got = spec.generate(SMALL_PROMPTS, params, use_tqdm=False)
    assert [g.outputs[0].token_ids for g in got] == [r.outputs[0].token_ids for r in ref]
    stats = spec.get_stats()
    assert 0 < stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"], stats
    assert_all_blocks_free(stats)
    # The full-vocabulary model, where drafts are rare: text too.
    for r, g in zip(plain.generate(COPY_PROMPTS, GREEDY, use_tqdm=False),
                    ngram_llm.generate(COPY_PROMPTS, GREEDY, use_tqdm=False)):
        assert (g.outputs[0].token_ids, g.outputs[0].text) == (r.outputs[0].token_ids, r.outputs[0].text)
    assert_all_blocks_free(ngram_llm.get_stats())


def test_oracle_drafts_with_preemption_n_and_stops(tiny_llama_dir, plain):
    """Partly wrong drafts through a cache tight enough to preempt, n > 1 siblings, prefix-cache hits (the same
    prompt twice), logprobs, stop token ids and stop strings: every output equals the one without speculation."""
    tight = make_llm(tiny_llama_dir, {"method": "ngram", "num_speculative_tokens": 5}, blocks=14,
                     max_num_batched_tokens=48)
    vocab = tight.llm_engine.model_config.vocab_size
    prompts = COPY_PROMPTS + COPY_PROMPTS[:2]
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    references = [full_ids(o) for o in plain.generate(prompts, long, use_tqdm=False)]
    oracle = OracleProposer(references, vocab)
    tight.llm_engine.core.speculator.proposer = oracle

    def same(params):
        ref = plain.generate(prompts, params, use_tqdm=False)
        got = tight.generate(prompts, params, use_tqdm=False)
        for r, g in zip(ref, got):
            assert [o.token_ids for o in g.outputs] == [o.token_ids for o in r.outputs]
            assert [o.text for o in g.outputs] == [o.text for o in r.outputs]
            assert [o.finish_reason for o in g.outputs] == [o.finish_reason for o in r.outputs]
        return ref, got

    before = tight.get_stats()
    same(long)
    stats = tight.get_stats()
    assert stats["num_preemptions"] > before["num_preemptions"], "the cache must be tight enough to preempt"
    assert 0 < stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"]
    assert stats["prefix_cache_hit_tokens"] > before["prefix_cache_hit_tokens"]
    assert_all_blocks_free(stats)

    ref, got = same(SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, n=2, logprobs=2))
    for r, g in zip(ref, got):
        for ro, go in zip(r.outputs, g.outputs):
            assert [sorted(p) for p in go.logprobs] == [sorted(p) for p in ro.logprobs]
            for rp, gp in zip(ro.logprobs, go.logprobs):
                for tid in rp:
                    assert gp[tid].logprob == pytest.approx(rp[tid].logprob, abs=1e-4)

    # Stops in the middle of an accepted run of drafts.
    outs = plain.generate(prompts, long, use_tqdm=False)
    stop_id = outs[0].outputs[0].token_ids[9]
    same(SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[stop_id]))
    text = outs[1].outputs[0].text
    same(SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[text[len(text) // 2:][:3]]))
    assert_all_blocks_free(tight.get_stats())


def test_abort_mid_speculation_frees_blocks(tiny_llama_dir, plain):
    llm = make_llm(tiny_llama_dir, {"method": "ngram", "num_speculative_tokens": 4}, blocks=64)
    engine = llm.llm_engine
    references = [full_ids(o) for o in plain.generate(COPY_PROMPTS, GREEDY, use_tqdm=False)]
    engine.core.speculator.proposer = OracleProposer(references, engine.model_config.vocab_size)
    for i, p in enumerate(COPY_PROMPTS):
        engine.add_request(f"a{i}", p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.get_stats()["spec_num_draft_tokens"] > 0
    engine.abort_request([f"a{i}" for i in range(len(COPY_PROMPTS))])
    assert_all_blocks_free(engine.get_stats())


def test_smollm2_ngram_greedy_identical(smollm2_gguf):
    spec = LLM(str(smollm2_gguf), dtype="float32", num_threads=1, kv_cache_memory=64 << 20,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                                   "prompt_lookup_min": 1})
    prompt = [{"role": "user", "content": "Repeat exactly: the quick brown fox jumps over the lazy dog. "
                                          "The quick brown fox jumps over the lazy dog."}]
    params = SamplingParams(temperature=0.0, max_tokens=20)
    core = spec.llm_engine.core
    speculator, core.speculator = core.speculator, None  # the same engine without speculation is the reference
    ref = spec.chat(prompt, params, use_tqdm=False)[0].outputs[0]
    core.speculator = speculator
    got = spec.chat(prompt, params, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == ref.token_ids
    stats = spec.get_stats()
    assert stats["spec_num_accepted_tokens"] > 0 and stats["spec_mean_tokens_per_step"] > 1.0
    assert_all_blocks_free(stats)


# -- sampled output follows the target distribution ----------------------------------------------------------------
def _req(params: SamplingParams, rid: str) -> Request:
    return Request(rid, [1], params, arrival_time=0.0, max_tokens=64)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3,
                                                                                            top_p=0.8)])
def test_rejection_sampler_keeps_the_target_distribution(kw):
    """Each request drafts two tokens (a likely one, then an unlikely one) over fixed logits; the first emitted
    token and the token after an accepted first draft both follow the plain sampler's distribution."""
    rows = 6000
    logits1 = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0])
    logits2 = logits1.flip(0)
    params = SamplingParams(max_tokens=8, **kw)
    requests = [_req(params, str(i)) for i in range(rows)]
    drafts = [[1, 7]] * rows
    # rows per request: position 0, position 1 (after draft 1), bonus position (after draft 7)
    logits = torch.stack([logits1, logits2, logits1] * rows)
    out = RejectionSampler(Sampler(Ops.reference(), seed=123))(logits, requests, drafts)
    first = collections.Counter(t[0] for t in out.token_ids)
    second = collections.Counter(t[1] for t in out.token_ids if t[0] == 1)
    ref_kw = {k: v for k, v in kw.items()}
    for counts, lg in ((first, logits1), (second, logits2)):
        p = reference_probs(lg, **ref_kw)
        total = sum(counts.values())
        stat, dof = 0.0, -1
        for tok in range(10):
            expected = float(p[tok]) * total
            if expected > 0:
                stat += (counts.get(tok, 0) - expected) ** 2 / expected
                dof += 1
            else:
                assert counts.get(tok, 0) == 0, f"token {tok} has zero target probability"
        assert chi2_pvalue(stat, dof) > 1e-3, (counts, p)
    assert out.num_draft_tokens == 2 * rows and 0 < out.num_accepted_tokens < 2 * rows


def test_engine_histograms_with_and_without_speculation(small_vocab_dir, small_plain):
    """Sampled continuations of one prompt: the joint histogram of the first three tokens under speculation
    (oracle drafts, partly wrong) matches the histogram without it (two-sample chi-square)."""
    spec = make_llm(small_vocab_dir, {"method": "ngram", "num_speculative_tokens": 3}, blocks=512)
    prompt = {"prompt_token_ids": SMALL_PROMPTS[2]}
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False)
    greedy_ref = full_ids(small_plain.generate(prompt, greedy, use_tqdm=False)[0])
    spec.llm_engine.core.speculator.proposer = OracleProposer([greedy_ref], spec.llm_engine.model_config.vocab_size)
    params = SamplingParams(temperature=0.5, top_k=4, max_tokens=3, ignore_eos=True, n=100, detokenize=False)
    hist = []
    for llm in (small_plain, spec):
        counts = collections.Counter()
        for seed in range(4):
            out = llm.generate(prompt, params.clone(seed=1000 + seed), use_tqdm=False)[0]
            counts.update(tuple(o.token_ids) for o in out.outputs)
        hist.append(counts)
    assert spec.get_stats()["spec_num_accepted_tokens"] > 0
    keys = [k for k in set(hist[0]) | set(hist[1]) if hist[0][k] + hist[1][k] >= 5]
    rest = [sum(h[k] for k in h if k not in keys) for h in hist]
    cells = [(hist[0][k], hist[1][k]) for k in keys] + ([tuple(rest)] if sum(rest) >= 5 else [])
    n0, n1 = sum(hist[0].values()), sum(hist[1].values())
    stat = 0.0
    for a, b in cells:
        tot = a + b
        for obs, n in ((a, n0), (b, n1)):
            exp = tot * n / (n0 + n1)
            stat += (obs - exp) ** 2 / exp
    assert len(cells) >= 3
    assert chi2_pvalue(stat, len(cells) - 1) > 1e-3, hist
    assert_all_blocks_free(spec.get_stats())


# -- draft-model proposer ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("draft_kind", ["llama", "qwen2"])
def test_draft_model_greedy_identical(tiny_model_dirs, plain, draft_kind):
    """The target itself as its draft (every draft accepted) and another tiny model with the same tokenizer
    (mostly rejected), through a cache tight enough to preempt and n > 1: output equals plain decoding."""
    target = tiny_model_dirs["llama"]
    spec = make_llm(target, {"model": str(tiny_model_dirs[draft_kind]), "num_speculative_tokens": 3}, blocks=14,
                    max_num_batched_tokens=64)
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=2)]
    for sp in params:
        ref = plain.generate(COPY_PROMPTS, sp, use_tqdm=False)
        got = spec.generate(COPY_PROMPTS, sp, use_tqdm=False)
        for r, g in zip(ref, got):
            assert [o.token_ids for o in g.outputs] == [o.token_ids for o in r.outputs]
    stats = spec.get_stats()
    assert stats["num_preemptions"] > 0, "the cache must be tight enough to preempt"
    if draft_kind == "llama":
        assert stats["spec_acceptance_rate"] > 0.9, stats
    else:
        assert stats["spec_num_draft_tokens"] > 0
    assert_all_blocks_free(stats)


def test_draft_vocab_must_match(tiny_llama_dir, small_vocab_dir):
    with pytest.raises(ValueError, match=r"speculative_config\.model: the draft's vocabulary \(64 tokens\)"):
        make_llm(tiny_llama_dir, {"method": "draft_model", "model": str(small_vocab_dir),
                                  "num_speculative_tokens": 2})


# -- verification on the decode path -------------------------------------------------------------------------------
class EagerDecodeRunner:
    """Stands in for a platform's captured decode step on hosts without one (a float32 model on a CPU without bf16
    runs eagerly): runs the step's forward over the live rows, and records each batch's row count."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.rows: list[int] = []

    def capture(self) -> None:
        pass

    def padded_size(self, n: int) -> int | None:
        return n if 1 <= n <= max(self.spec.batch_sizes) else None

    def run(self, **inputs: torch.Tensor) -> torch.Tensor:
        n = inputs["input_ids"].shape[0]
        self.rows.append(n)
        return self.spec.forward(**inputs, query_start_loc=torch.arange(n + 1, dtype=torch.int32))


def test_verification_and_draft_steps_take_the_decode_step(tiny_model_dirs, plain, monkeypatch):
    """A verification step is one decode row per token (each over its own prefix) and a draft model's steps are
    decodes too, so both go to the platform's decode-step runner (sized for max_num_seqs x (1 + k) rows) instead
    of the prefill path; greedy output stays that of plain decoding, through preemption, and every block comes
    back."""
    from llmctl_cpu.platform import CpuPlatform

    runners: list[EagerDecodeRunner] = []

    def fake_runner(self, spec):
        runners.append(EagerDecodeRunner(spec))
        return runners[-1]

    monkeypatch.setattr(CpuPlatform, "decode_step_runner", fake_runner)
    k, seqs = 3, 4
    target = tiny_model_dirs["llama"]
    spec = make_llm(target, {"model": str(tiny_model_dirs["qwen2"]), "num_speculative_tokens": k}, blocks=14,
                    max_num_batched_tokens=64, max_num_seqs=seqs)
    core = spec.llm_engine.core
    draft_runner, target_runner = runners  # the draft is loaded (and captured) before the target's runner
    assert core.runner.decode_runner is target_runner and core.speculator.draft.runner.decode_runner is draft_runner
    assert max(target_runner.spec.batch_sizes) == max(draft_runner.spec.batch_sizes) == seqs * (1 + k)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    ref = plain.generate(COPY_PROMPTS, params, use_tqdm=False)
    got = spec.generate(COPY_PROMPTS, params, use_tqdm=False)
    assert [g.outputs[0].token_ids for g in got] == [r.outputs[0].token_ids for r in ref]
    stats = spec.get_stats()
    assert stats["num_preemptions"] > 0 and stats["spec_num_draft_tokens"] > 0, stats
    assert_all_blocks_free(stats)
    # verification steps: more rows than sequences (a plain decode step has one row per sequence)
    assert max(target_runner.rows) > seqs, target_runner.rows
    assert draft_runner.rows, "the draft's decode steps replay too"

    # The same with prompt lookup (oracle drafts, partly wrong) and n > 1 siblings.
    runners.clear()
    lookup = make_llm(target, {"method": "ngram", "num_speculative_tokens": k}, max_num_seqs=seqs)
    references = [full_ids(o) for o in plain.generate(COPY_PROMPTS, params, use_tqdm=False)]
    lookup.llm_engine.core.speculator.proposer = OracleProposer(references, lookup.llm_engine.model_config.vocab_size)
    (runner,) = runners
    for sp in (params, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=2)):
        ref = plain.generate(COPY_PROMPTS, sp, use_tqdm=False)
        got = lookup.generate(COPY_PROMPTS, sp, use_tqdm=False)
        for r, g in zip(ref, got):
            assert [o.token_ids for o in g.outputs] == [o.token_ids for o in r.outputs]
    stats = lookup.get_stats()
    assert 0 < stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"], stats
    assert max(runner.rows) > seqs
    assert_all_blocks_free(stats)


def test_disable_by_batch_size_drafts_only_below_the_limit(small_vocab_dir, small_plain):
    """Six requests decoding in lockstep never draft with disable_by_batch_size 2; one request alone does. Output
    is plain decoding's either way."""
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, detokenize=False)
    spec = make_llm(small_vocab_dir, {**NGRAM, "disable_by_batch_size": 2})
    ref = small_plain.generate(SMALL_PROMPTS, params, use_tqdm=False)
    got = spec.generate(SMALL_PROMPTS, params, use_tqdm=False)
    assert [g.outputs[0].token_ids for g in got] == [r.outputs[0].token_ids for r in ref]
    assert spec.get_stats()["spec_num_draft_tokens"] == 0
    got = spec.generate(SMALL_PROMPTS[-1:], params, use_tqdm=False)
    assert got[0].outputs[0].token_ids == ref[-1].outputs[0].token_ids
    stats = spec.get_stats()
    assert stats["spec_num_draft_tokens"] > 0
    assert_all_blocks_free(stats)
