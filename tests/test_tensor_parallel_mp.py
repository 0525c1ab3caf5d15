"""The ``mp`` executor: ``LLM(model, tensor_parallel_size=2)`` spawns two ranks and gives the tokens of one
process; a rank that dies or hangs ends the engine with ``EngineDeadError``, and no worker outlives it."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests._engine_util import one_torch_thread
from tests.model_factory import make_tiny_model
from tests.tp_rank import PROMPTS, generate


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory, test_tokenizer):
    return make_tiny_model("llama", tmp_path_factory.mktemp("tp-mp") / "llama", test_tokenizer,
                           num_key_value_heads=1)


@pytest.fixture(scope="module")
def tp1(gqa_model):
    from llmctl import LLM

    with one_torch_thread():
        yield LLM(str(gqa_model), dtype="float32", num_threads=1, seed=0)


@pytest.fixture(scope="module")
def tp2(gqa_model):
    from llmctl import LLM

    llm = LLM(str(gqa_model), dtype="float32", tensor_parallel_size=2, num_threads=1, seed=0)
    yield llm
    llm.llm_engine.shutdown()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_mp_tp2_greedy_matches_tp1(tp1, tp2):
    import torch

    assert len(tp2.llm_engine.core.worker_pids) == 2
    with one_torch_thread():
        want = generate(tp1)
    got = generate(tp2)
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        torch.testing.assert_close(torch.tensor(g["logprobs"]), torch.tensor(w["logprobs"]), atol=1e-4, rtol=1e-4)


def test_mp_tp2_seeded_sampling_n_and_stop_strings_match_tp1(tp1, tp2):
    from llmctl import SamplingParams

    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=7, n=2, max_tokens=10),
              SamplingParams(temperature=0.0, max_tokens=20, stop=[" the", ","], ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=6, presence_penalty=1.5, ignore_eos=True)]
    with one_torch_thread():
        want = tp1.generate(PROMPTS, params, use_tqdm=False)
    got = tp2.generate(PROMPTS, params, use_tqdm=False)
    for g, w in zip(got, want, strict=True):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in w.outputs]
        assert [(c.text, c.finish_reason) for c in g.outputs] == [(c.text, c.finish_reason) for c in w.outputs]
    stats = tp2.get_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_running"] == 0, stats


def test_mp_tp2_structured_output_matches_tp1(tp1, tp2):
    """Grammars do not travel over the pipe: each rank compiles the request's constraint itself."""
    from llmctl import SamplingParams
    from llmctl.structured_output import StructuredOutputsParams

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    params = [SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=StructuredOutputsParams(json=schema)),
              SamplingParams(temperature=0.0, max_tokens=5,
                             structured_outputs=StructuredOutputsParams(choice=["alpha", "beta"]))]
    with one_torch_thread():
        want = tp1.generate(PROMPTS[:2], params, use_tqdm=False)
    got = tp2.generate(PROMPTS[:2], params, use_tqdm=False)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in want]
    assert got[1].outputs[0].text in ("alpha", "beta")


def test_mp_pp2_matches_tp1(gqa_model, tp1):
    """Two pipeline stages as worker processes: one layer each, the last stage's logits broadcast."""
    import torch
    from llmctl import LLM

    llm = LLM(str(gqa_model), dtype="float32", pipeline_parallel_size=2, num_threads=1, seed=0)
    try:
        got = generate(llm)
    finally:
        llm.llm_engine.shutdown()
    with one_torch_thread():
        want = generate(tp1)
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        torch.testing.assert_close(torch.tensor(g["logprobs"]), torch.tensor(w["logprobs"]), atol=1e-4, rtol=1e-4)


def test_mp_heads_not_divisible_fails_before_spawning(gqa_model):
    from llmctl import LLM

    with pytest.raises(ValueError, match=r"tensor_parallel_size: 3 does not divide num_attention_heads=4"):
        LLM(str(gqa_model), tensor_parallel_size=3, num_threads=1)


def _assert_dies_cleanly(llm, action, num_prompts: int = 3) -> None:
    from llmctl import SamplingParams
    from llmctl.engine.errors import EngineDeadError

    pids = list(llm.llm_engine.core.worker_pids)
    core = llm.llm_engine.core
    rings = [c._ring.name for c in getattr(core, "replicas", [core])]  # one per data-parallel replica
    assert all(os.path.exists(f"/dev/shm/{r}") for r in rings)  # steps go through the shared-memory rings
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # the ranks work
    action(pids)
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match="engine workers died: .*rank"):
        llm.generate([PROMPTS[i % 3] * 8 for i in range(num_prompts)],
                     SamplingParams(max_tokens=50, ignore_eos=True), use_tqdm=False)
    assert time.monotonic() - start < 30
    with pytest.raises(EngineDeadError):  # and stays dead
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a worker outlived the dead engine"
    assert not any(os.path.exists(f"/dev/shm/{r}") for r in rings), "the dead engine left a ring in /dev/shm"


def test_mp_killed_rank_is_engine_dead_not_a_hang(gqa_model):
    from llmctl import LLM

    llm = LLM(str(gqa_model), dtype="float32", tensor_parallel_size=2, num_threads=1)
    _assert_dies_cleanly(llm, lambda pids: os.kill(pids[1], signal.SIGKILL))


@pytest.mark.parametrize("num_prompts", [3, 300], ids=["small-step", "step-message-fills-the-pipe"])
def test_mp_hung_rank_times_out_into_engine_dead(gqa_model, monkeypatch, num_prompts):
    """A stopped rank: the step's answer never comes, and with 300 new requests the step's message (over 64 KiB)
    cannot even be written into the stopped rank's pipe; both end within the step timeout."""
    from llmctl import LLM

    monkeypatch.setenv("LLMCTL_EXECUTE_MODEL_TIMEOUT_SECONDS", "3")
    llm = LLM(str(gqa_model), dtype="float32", tensor_parallel_size=2, num_threads=1)
    _assert_dies_cleanly(llm, lambda pids: os.kill(pids[1], signal.SIGSTOP), num_prompts)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def test_serve_tp2_matches_tp1_and_exits_nonzero_when_a_rank_dies(gqa_model, tp1):
    """``llmctl serve -tp 2``: the same greedy completion as one process; killing a rank mid-stream fails the
    stream, the server exits non-zero and leaves no worker behind."""
    import subprocess
    import sys
    import tempfile
    import threading
    from pathlib import Path

    import httpx
    from llmctl import SamplingParams

    from tests.test_server_process import _wait_health
    from tests.test_server_support import free_port

    llmctl = str(Path(sys.executable).parent / "llmctl")
    port = free_port()
    # The server's output goes to a file, not a pipe nobody reads: a dying rank's tracebacks can fill a pipe's
    # buffer, and a server blocked writing its log never exits.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([llmctl, "serve", str(gqa_model), "-tp", "2", "--dtype", "float32", "--port", str(port),
                             "--kv-cache-memory", "16MiB", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "LLMCTL_CPU_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    workers: list[int] = []
    try:
        _wait_health(url, proc, timeout=180)
        workers = [p for p in _children(proc.pid) if _alive(p)]
        body = {"model": str(gqa_model), "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0.0,
                "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        with one_torch_thread():
            want = tp1.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0].text
        assert r.json()["choices"][0]["text"] == want

        # a long stream, and a rank killed while it runs
        events: list[str] = []

        def stream() -> None:
            with httpx.stream("POST", url + "/v1/completions", timeout=60,
                              json={**body, "max_tokens": 400, "stream": True}) as resp:
                events.extend(resp.iter_lines())

        t = threading.Thread(target=stream)
        t.start()
        deadline = time.monotonic() + 30
        while not any(e.startswith("data: {") for e in events) and time.monotonic() < deadline:
            time.sleep(0.02)
        ranks = [p for p in workers if "spawn" in open(f"/proc/{p}/cmdline").read()]
        assert len(ranks) == 2, workers
        os.kill(ranks[1], signal.SIGKILL)
        t.join(60)
        assert not t.is_alive()
        assert any("error" in e for e in events), events[-3:]
        try:
            assert proc.wait(60) != 0
        except subprocess.TimeoutExpired:
            log.seek(0)
            raise AssertionError(f"the server did not exit 60 s after a rank died; its log ends:\n"
                                 f"{log.read()[-4000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), "a worker outlived the server"


def test_smollm2_tp3_matches_tp1_and_tp2_is_refused(smollm2_gguf):
    """The real SmolLM2-135M (GGUF, 9 heads, 3 KV heads): 3 ranks of 3 heads and 1 KV head each give the greedy
    tokens of one process in fp32; 2 ranks cannot split 9 heads and are refused by name."""
    from llmctl import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = ["The capital of France is", "def add(a, b):"]
    with pytest.raises(ValueError, match=r"tensor_parallel_size: 2 does not divide num_attention_heads=9"):
        LLM(str(smollm2_gguf), tensor_parallel_size=2)
    with one_torch_thread():
        ref = LLM(str(smollm2_gguf), dtype="float32", num_threads=1, max_model_len=128)
        want = [o.outputs[0].token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
        del ref
    llm = LLM(str(smollm2_gguf), dtype="float32", tensor_parallel_size=3, num_threads=1, max_model_len=128)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.llm_engine.shutdown()
    assert got == want
