"""Sampler: empirical frequencies match the computed distribution; greedy, penalties, logprobs; engine-level
per-request seeds and prompt logprobs against transformers."""

from __future__ import annotations

import math

import pytest
import torch
from llmctl import LLM, SamplingParams
from llmctl.engine.request import Request
from llmctl.engine.sampler import Sampler, apply_penalties
from llmctl.ops import Ops

from tests._engine_util import _single_thread  # noqa: F401

ROWS = 20000
LOGITS = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0])


def req(params: SamplingParams, prompt=(1,), output=(), eos=(), rid="r") -> Request:
    r = Request(rid, list(prompt), params, arrival_time=0.0, eos_token_ids=tuple(eos), max_tokens=64)
    r.all_token_ids.extend(output)
    return r


def reference_probs(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """The target distribution, computed from the definitions one token at a time (no shared code)."""
    vals = [float(x) / temperature for x in logits.double()]
    order = sorted(range(len(vals)), key=lambda i: -vals[i])
    keep = set(order[:top_k]) if top_k > 0 else set(order)

    def softmax_over(ids):
        m = max(vals[i] for i in ids)
        z = sum(math.exp(vals[i] - m) for i in ids)
        return {i: math.exp(vals[i] - m) / z for i in ids}

    if top_p < 1.0:
        p = softmax_over(keep)
        nucleus, mass = set(), 0.0
        for i in order:
            if i not in keep:
                continue
            if mass >= top_p:
                break
            nucleus.add(i)
            mass += p[i]
        keep = nucleus
    if min_p > 0.0:
        p = softmax_over(keep)
        top = max(p.values())
        keep = {i for i in keep if p[i] >= min_p * top}
    p = softmax_over(keep)
    return torch.tensor([p.get(i, 0.0) for i in range(len(vals))], dtype=torch.float64)


def chi2_pvalue(stat: float, dof: int) -> float:
    return float(1.0 - torch.distributions.Chi2(torch.tensor(float(dof), dtype=torch.float64)).cdf(
        torch.tensor(stat, dtype=torch.float64)))


CASES = [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=2.0),
    dict(temperature=1.0, top_k=3),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.7, top_p=0.6),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=1.5, top_k=6, top_p=0.9, min_p=0.05),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_empirical_frequencies_match_distribution(case):
    sampler = Sampler(Ops.reference(), seed=1234)
    params = SamplingParams(max_tokens=4, **case)
    requests = [req(params, rid=str(i)) for i in range(ROWS)]
    out = sampler(LOGITS.repeat(ROWS, 1).clone(), requests)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=len(LOGITS)).double()
    expected = reference_probs(LOGITS, **case)
    support = expected > 0
    assert counts[~support].sum() == 0, f"sampled masked tokens: {counts.tolist()} vs {expected.tolist()}"
    exp_counts = expected[support] * ROWS
    stat = float(((counts[support] - exp_counts) ** 2 / exp_counts).sum())
    dof = int(support.sum()) - 1
    if dof > 0:
        assert chi2_pvalue(stat, dof) > 1e-4, f"chi2={stat:.1f} dof={dof}: {counts.tolist()} vs {exp_counts.tolist()}"
    tv = 0.5 * float((counts / ROWS - expected).abs().sum())
    assert tv < 0.02


def test_mixed_batch_rows_follow_their_own_params():
    """Rows of different params in one batch: each row's marginal matches its own distribution."""
    sampler = Sampler(Ops.reference(), seed=7)
    cases = [dict(temperature=1.0, top_k=2), dict(temperature=0.0), dict(temperature=1.0, top_p=0.5)]
    per = 6000
    requests, logits = [], []
    for i in range(per):
        for j, c in enumerate(cases):
            requests.append(req(SamplingParams(max_tokens=4, **c), rid=f"{i}-{j}"))
            logits.append(LOGITS)
    out = torch.tensor(sampler(torch.stack(logits), requests).token_ids).view(per, len(cases))
    for j, c in enumerate(cases):
        counts = torch.bincount(out[:, j], minlength=len(LOGITS)).double()
        if c["temperature"] == 0.0:
            assert counts[0] == per
            continue
        expected = reference_probs(LOGITS, **c)
        assert 0.5 * float((counts / per - expected).abs().sum()) < 0.03


def test_greedy_is_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 500, generator=g)
    requests = [req(SamplingParams(temperature=0.0), rid=str(i)) for i in range(64)]
    out = Sampler(Ops.reference())(logits.clone(), requests)
    assert out.token_ids == logits.argmax(-1).tolist()
    # Greedy rows inside a random batch are still argmax.
    mixed = [req(SamplingParams(temperature=0.0 if i % 2 else 1.0), rid=str(i)) for i in range(64)]
    out = Sampler(Ops.reference())(logits.clone(), mixed)
    assert [t for i, t in enumerate(out.token_ids) if i % 2] == logits.argmax(-1).tolist()[1::2]


def hand_penalised(logits: list[float], prompt: list[int], output: list[int], rep: float, pres: float,
                   freq: float) -> list[float]:
    out = []
    for t, x in enumerate(logits):
        if t in prompt or t in output:
            x = x / rep if x > 0 else x * rep
        c = output.count(t)
        x -= freq * c
        if c:
            x -= pres
        out.append(x)
    return out


@pytest.mark.parametrize("rep,pres,freq", [(1.3, 0.0, 0.0), (1.0, 0.7, 0.0), (1.0, 0.0, 0.4), (0.8, -0.5, 1.1)])
def test_penalties_match_hand_computed_transform(rep, pres, freq):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 12, generator=g)
    prompt, output = [1, 2, 2, 5], [5, 7, 7, 7, 11]
    requests = [req(SamplingParams(temperature=0.0, repetition_penalty=rep, presence_penalty=pres,
                                   frequency_penalty=freq), prompt=prompt, output=output, rid="a"),
                req(SamplingParams(temperature=0.0), prompt=prompt, output=output, rid="b"),  # no penalties
                req(SamplingParams(temperature=0.0, repetition_penalty=rep, presence_penalty=pres,
                                   frequency_penalty=freq), prompt=[0], output=[], rid="c")]
    got = apply_penalties(logits.clone(), requests)
    want = torch.tensor([hand_penalised(logits[0].tolist(), prompt, output, rep, pres, freq),
                         logits[1].tolist(),
                         hand_penalised(logits[2].tolist(), [0], [], rep, pres, freq)])
    torch.testing.assert_close(got, want)
    # The sampler picks the argmax of the penalised logits and reports logprobs of the raw ones.
    out = Sampler(Ops.reference())(logits.clone(), [requests[0]] * 1)
    assert out.token_ids[0] == int(want[0].argmax())


def test_min_tokens_masks_eos_and_stop_ids_in_sampler():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]] * 3)
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1])
    rows = [req(params, output=[], eos=[0], rid="0"), req(params, output=[3], eos=[0], rid="1"),
            req(params, output=[3, 3], eos=[0], rid="2")]
    assert Sampler(Ops.reference())(logits.clone(), rows).token_ids == [2, 2, 0]


def test_logprobs_and_ranks():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(5, 40, generator=g)
    requests = [req(SamplingParams(temperature=1.0, logprobs=k, seed=i), rid=str(i)) for i, k in
                enumerate([0, 1, 3, 5, None])]
    out = Sampler(Ops.reference())(logits.clone(), requests)
    ref = logits.double().log_softmax(-1)
    for i, k in enumerate([0, 1, 3, 5, None]):
        row = out.logprobs[i]
        if k is None:
            assert row is None
            continue
        tok = out.token_ids[i]
        assert abs(row.sampled_logprob - float(ref[i, tok])) < 1e-5
        assert row.sampled_rank == 1 + int((ref[i] > ref[i, tok]).sum())
        order = ref[i].argsort(descending=True)[:k].tolist()
        assert row.top_ids == order
        assert all(abs(a - float(ref[i, t])) < 1e-5 for a, t in zip(row.top_logprobs, order))


# -- engine level -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", num_threads=1, max_num_batched_tokens=32,
               kv_cache_memory=128 << 13)


def test_per_request_seed_same_alone_or_batched(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=4242, max_tokens=12, ignore_eos=True)
    alone = llm.generate("A seeded prompt about rivers", seeded, use_tqdm=False)[0].outputs[0].token_ids
    prompts = ["noise one", "A seeded prompt about rivers", "noise two with more words in it", "x y z"]
    params = [SamplingParams(temperature=1.0, max_tokens=12), seeded,
              SamplingParams(temperature=0.8, seed=1, max_tokens=20), SamplingParams(temperature=1.2, max_tokens=5)]
    batched = llm.generate(prompts, params, use_tqdm=False)
    assert batched[1].outputs[0].token_ids == alone
    again = llm.generate(["other first", "A seeded prompt about rivers"],
                         [SamplingParams(temperature=1.0, max_tokens=3), seeded], use_tqdm=False)
    assert again[1].outputs[0].token_ids == alone
    other_seed = llm.generate("A seeded prompt about rivers", seeded.clone(seed=4243), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def test_sampled_logprobs_and_ranks_match_transformers(llm, hf_model):
    out = llm.generate("The sampled logprobs of a", SamplingParams(temperature=1.0, seed=9, max_tokens=8, logprobs=4,
                                                                   ignore_eos=True), use_tqdm=False)[0]
    comp = out.outputs[0]
    full = out.prompt_token_ids + comp.token_ids
    ref = hf_logprobs(hf_model, full)
    n = len(out.prompt_token_ids)
    total = 0.0
    for j, (tok, lp) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[n - 1 + j]
        assert abs(lp[tok].logprob - float(row[tok])) < 1e-3
        # near-ties may order differently in the two implementations: bound the rank by the tolerance
        lo, hi = 1 + int((row > row[tok] + 1e-4).sum()), 1 + int((row > row[tok] - 1e-4).sum())
        assert lo <= lp[tok].rank <= hi, (lp[tok].rank, lo, hi)
        top = row.topk(4)
        for r, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=1):
            assert t in lp and abs(lp[t].logprob - v) < 1e-3
            if t != tok:
                assert lp[t].rank == r
        total += lp[tok].logprob
    assert abs(comp.cumulative_logprob - total) < 1e-4


def test_prompt_logprobs_match_transformers(llm, hf_model):
    prompt = "Prompt logprobs are computed across chunk boundaries: " + "one two three four " * 10
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    assert len(ids) > 40  # more than one prefill chunk of 32
    ref = hf_logprobs(hf_model, ids)
    plp = out.prompt_logprobs
    assert len(plp) == len(ids) and plp[0] is None
    for i in range(1, len(ids)):
        row, tok = ref[i - 1], ids[i]
        assert abs(plp[i][tok].logprob - float(row[tok])) < 1e-3, i
        # near-ties may order differently in the two implementations: bound the rank by the tolerance
        lo, hi = 1 + int((row > row[tok] + 1e-4).sum()), 1 + int((row > row[tok] - 1e-4).sum())
        assert lo <= plp[i][tok].rank <= hi, (plp[i][tok].rank, lo, hi)
        top = row.topk(3)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert t in plp[i] and abs(plp[i][t].logprob - v) < 1e-3
    # Prompt logprobs are right even when the prompt's blocks are in the prefix cache.
    again = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3), use_tqdm=False)[0]
    assert [{k: round(v.logprob, 4) for k, v in d.items()} for d in again.prompt_logprobs[1:]] == \
        [{k: round(v.logprob, 4) for k, v in d.items()} for d in plp[1:]]


def test_bfloat16_logits_greedy_and_mixed_batches_agree_with_float32():
    """The runner hands over logits in the model's dtype: all-greedy batches go through ``greedy_sample`` without a
    float32 copy, every other batch is cast first; tokens and logprobs equal those from float32 logits."""
    torch.manual_seed(5)
    logits = torch.randn(6, 300).bfloat16()
    calls = []

    def greedy_sample(x):
        calls.append(x.dtype)
        return x.float().argmax(dim=-1)

    ops = Ops(**{**Ops.reference().__dict__, "greedy_sample": greedy_sample})
    greedy = [req(SamplingParams(temperature=0.0, logprobs=3 if i % 2 else None), rid=str(i)) for i in range(6)]
    out = Sampler(ops)(logits, greedy)
    want = Sampler(ops)(logits.float(), greedy)
    assert calls == [torch.bfloat16, torch.float32]
    assert out.token_ids == want.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs == want.logprobs and out.logprobs[1] is not None
    penalised = [req(SamplingParams(temperature=0.0, presence_penalty=1.5), output=(int(want.token_ids[0]),))]
    out = Sampler(ops)(logits[:1], penalised)  # penalties: the float32 path, not greedy_sample
    assert len(calls) == 2 and out.token_ids == Sampler(ops)(logits[:1].float(), penalised).token_ids
