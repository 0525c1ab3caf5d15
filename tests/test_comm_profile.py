"""The tensor-parallel benchmark's seam (``llmctl.engine.comm_profile``): it counts a communicator's collectives
and the time inside them, times the core's steps, reports both through ``get_stats`` and a file per rank, and
wraps nothing without its variable. Then the benchmark script end to end on a tiny model with two ranks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from llmctl.engine import comm_profile as cp
from llmctl.tensor_parallel import TensorParallelGroup


class _FakeClock:
    """A perf_counter that advances by each call's declared cost, so the totals are exact, not measured."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _FakeCommunicator:
    name, platform = "fake", "cpu"

    def __init__(self, clock: _FakeClock) -> None:
        self.clock = clock
        self.seen: list[str] = []

    def all_reduce(self, tensor):
        self.seen.append("all_reduce")
        self.clock.now += 0.25
        return tensor * 2

    def all_gather(self, tensor, dim=0):
        self.seen.append("all_gather")
        self.clock.now += 0.5
        return torch.cat([tensor, tensor], dim=dim)

    def broadcast(self, tensor, src=0):
        raise RuntimeError("peer gone")

    def destroy(self):
        self.seen.append("destroy")


class _FakeCore:
    def __init__(self, world: TensorParallelGroup, clock: _FakeClock) -> None:
        self.world, self.clock, self.shut = world, clock, False

    def step(self):
        self.clock.now += 1.0  # the rest of the step
        self.world.all_reduce(torch.ones(2))
        self.world.all_reduce(torch.ones(2))
        return self.world.all_gather(torch.ones(1)).tolist()

    def get_stats(self):
        return {"num_steps": 0}

    def shutdown(self):
        self.shut = True


@pytest.fixture
def fake_clock(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(cp.time, "perf_counter", clock)
    return clock


def test_counts_calls_and_time_and_reports_them(fake_clock, monkeypatch, tmp_path):
    monkeypatch.setenv(cp.COMM_PROFILE_ENV, str(tmp_path / "prof"))
    comm = _FakeCommunicator(fake_clock)
    core = _FakeCore(TensorParallelGroup(rank=1, size=2, communicator=comm), fake_clock)
    profile = cp.install_if_enabled(core)
    assert profile is not None and core.comm_profile is profile

    before = core.get_stats()
    assert core.step() == [1.0, 1.0]  # results pass through the wrapper untouched
    assert core.step() == [1.0, 1.0]
    after = core.get_stats()
    assert after["num_steps"] == 0  # the core's own stats are kept
    delta = cp.stats_delta(before, after)
    assert delta["all_reduce_calls"] == 4 and delta["all_gather_calls"] == 2 and delta["comm_calls"] == 6
    assert delta["all_reduce_s"] == pytest.approx(1.0) and delta["all_gather_s"] == pytest.approx(1.0)
    assert delta["comm_s"] == pytest.approx(2.0)
    assert delta["steps"] == 2 and delta["step_s"] == pytest.approx(4.0)  # 2 x (1 s + 0.5 + 0.5 in collectives)

    with pytest.raises(RuntimeError, match="peer gone"):  # a failing collective is still counted, and re-raised
        comm.broadcast(torch.ones(1))
    assert profile.calls["broadcast"] == 1 and profile.seconds["broadcast"] == 0.0

    core.shutdown()
    assert core.shut
    written = cp.read_profiles(tmp_path / "prof")
    assert list(written) == [1]
    assert written[1]["calls"] == {"all_reduce": 4, "all_gather": 2, "broadcast": 1}
    assert written[1]["steps"] == 2 and written[1]["comm_seconds"] == pytest.approx(2.0)


def test_nothing_is_wrapped_without_the_variable(monkeypatch):
    monkeypatch.delenv(cp.COMM_PROFILE_ENV, raising=False)
    comm = _FakeCommunicator(_FakeClock())
    core = _FakeCore(TensorParallelGroup(rank=0, size=2, communicator=comm), _FakeClock())
    step, reduce = core.step, comm.all_reduce
    assert cp.install_if_enabled(core) is None
    assert core.step == step and comm.all_reduce == reduce
    assert "step" not in vars(core) and "all_reduce" not in vars(comm)
    assert not hasattr(core, "comm_profile")


def test_single_rank_times_steps_only(fake_clock, monkeypatch, tmp_path):
    monkeypatch.setenv(cp.COMM_PROFILE_ENV, str(tmp_path))
    core = SimpleNamespace(world=TensorParallelGroup(), step=lambda: [], get_stats=dict, shutdown=lambda: None)
    profile = cp.install_if_enabled(core)
    core.step()
    assert profile.steps == 1 and profile.comm_calls == 0
    assert core.get_stats()["comm_profile_comm_calls"] == 0


@pytest.mark.slow
def test_tp_bench_script_runs_tp2_on_a_tiny_model(tiny_llama_dir, capsys):
    """Two ranks of the tiny Llama (2 layers): each step makes 2 all-reduces per layer, one for the embedding
    and one all-gather of the logits, and both ranks make the same calls."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tp_bench.py"
    spec = importlib.util.spec_from_file_location("tp_bench", path)
    tp_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp_bench)
    assert tp_bench.main(["--model", str(tiny_llama_dir), "--tp-sizes", "2", "--num-prompts", "2",
                          "--input-len", "8", "--output-len", "3", "--tpot-iterations", "1",
                          "--num-threads", "1"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (run,) = record["results"]
    assert run["tensor_parallel_size"] == 2
    for phase in ("throughput", "tpot"):
        s = run[phase]["split"]
        assert s["steps"] >= 3 and s["calls"]["all_gather"] == s["steps"]
        assert s["calls"]["all_reduce"] == 5 * s["steps"]
        # rank 0's steps of this phase alone fit inside the phase's wall time
        assert s["seconds"]["comm"] > 0 and s["seconds"]["compute"] > 0 and s["seconds"]["driver"] >= -1e-3
    lifetime = run["ranks_lifetime"]
    assert set(lifetime) == {"0", "1"} and lifetime["0"]["comm_calls"] == lifetime["1"]["comm_calls"] > 0
