"""The CUDA and ROCm plugins on a CPU-only host: discovery through entry points, honest probes, registrations,
and the platform logic exercised against simulated torch builds and devices (no GPU needed)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # in case this module is collected before the kernel tests

import socket  # noqa: E402
import types  # noqa: E402
from importlib import metadata  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from llmctl.plugins.manager import PluginManager  # noqa: E402

pytest.importorskip("llmctl_cuda", reason="pip install -e ./gpu -e ./triton_kernels -e ./plugin_cuda -e ./plugin_rocm")
pytest.importorskip("llmctl_rocm", reason="pip install -e ./gpu -e ./triton_kernels -e ./plugin_cuda -e ./plugin_rocm")

from llmctl_cuda import flash as cuda_flash  # noqa: E402
from llmctl_cuda.platform import CudaPlatform  # noqa: E402
from llmctl_gpu.communicator import GpuCommunicator  # noqa: E402
from llmctl_gpu.graph_runner import CudaGraphRunner  # noqa: E402
from llmctl_gpu.profile import kv_budget, profile_kv_cache_size  # noqa: E402
from llmctl_rocm.platform import RocmPlatform  # noqa: E402

CPU_ONLY_TORCH = torch.version.cuda is None and getattr(torch.version, "hip", None) is None
needs_cpu_torch = pytest.mark.skipif(not CPU_ONLY_TORCH, reason="asserts the behaviour of a CPU-only torch build")


@pytest.fixture(scope="module")
def manager() -> PluginManager:
    return PluginManager().load()


def test_entry_points_declared():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="llmctl.plugins")}
    assert eps.get("cuda") == "llmctl_cuda"
    assert eps.get("rocm") == "llmctl_rocm"


def test_plugins_load_through_entry_points(manager):
    for name, dist in (("cuda", "llmctl-cuda"), ("rocm", "llmctl-rocm")):
        info = manager.plugins[name]
        assert not info.broken, info.error
        assert info.api_version == "2.5" and info.distribution == dist
        assert manager.registry.platforms[name].plugin == name


@needs_cpu_torch
def test_probes_explain_cpu_only_torch(manager):
    for name in ("cuda", "rocm"):
        probe = manager.probe(name)
        assert not probe.available
        assert "CPU-only" in probe.reason and torch.__version__ in probe.reason
    assert "install a CUDA build of torch" in manager.probe("cuda").reason
    assert "install a ROCm build of torch" in manager.probe("rocm").reason


@needs_cpu_torch
def test_selection_does_not_pick_gpu_platforms(manager):
    chosen = manager.select_platform()
    assert chosen.name not in ("cuda", "rocm")
    if "cpu" in manager.registry.platforms:
        assert chosen.name == "cpu"
    with pytest.raises(ValueError, match="CPU-only"):
        manager.select_platform("cuda")  # asking for the device type explicitly explains why not


def test_registrations(manager):
    reg = manager.registry
    cuda_backends = [b.name for b in reg.backends_for("cuda")]
    assert cuda_backends[:3] == ["flash-attn", "flashinfer", "triton"]  # priority order
    assert "triton-rocm" in [b.name for b in reg.backends_for("rocm")]
    for platform in ("cuda", "rocm"):
        ops = reg.resolve_ops(platform)
        for op in ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul"):
            assert getattr(ops, op).__module__ == "llmctl_triton.ops", (platform, op)
        assert ops.apply_min_p.__module__ == "llmctl.ops.reference"
    assert reg.resolve_ops("cpu").rms_norm.__module__ != "llmctl_triton.ops"
    assert reg.communicator_for("cuda").name == "nccl" and reg.communicator_for("rocm").name == "rccl"


def test_attention_selection_falls_back_to_triton(manager):
    platform = manager.registry.platforms["cuda"].item
    backend = manager.select_attention_backend(platform, torch.float16, 128, 16,
                                               frozenset({"prefix_caching", "chunked_prefill"}))
    assert backend.name == "triton" and backend.platform == "cuda"
    fa = manager.registry.attention_backends["flash-attn"].item
    reason = fa.supports(torch.float16, 128, 256, frozenset()).reason
    if not cuda_flash.package_installed("flash_attn"):
        assert reason == "flash_attn is not installed (pip install flash-attn)"
    fi = manager.registry.attention_backends["flashinfer"].item
    if not cuda_flash.package_installed("flashinfer"):
        assert "flashinfer is not installed" in fi.supports(torch.float16, 128, 16, frozenset()).reason


def test_flash_backend_rules_with_simulated_gpu(monkeypatch):
    monkeypatch.setattr(cuda_flash, "package_installed", lambda name: True)
    monkeypatch.setattr(cuda_flash, "_capability", lambda: (8, 0))
    fa, fi = cuda_flash.FlashAttnBackend(), cuda_flash.FlashInferBackend()
    assert fa.supports(torch.bfloat16, 128, 256, frozenset({"sliding_window"}))
    assert "multiple of 256" in fa.supports(torch.bfloat16, 128, 16, frozenset()).reason
    assert "fp16/bf16" in fa.supports(torch.float32, 128, 256, frozenset()).reason
    assert "alibi" in fa.supports(torch.float16, 128, 256, frozenset({"alibi"})).reason
    assert fi.supports(torch.float16, 128, 16, frozenset())
    assert "head sizes" in fi.supports(torch.float16, 80, 16, frozenset()).reason
    monkeypatch.setattr(cuda_flash, "_capability", lambda: (7, 5))
    assert "compute capability >= 8.0" in fa.supports(torch.float16, 128, 256, frozenset()).reason
    assert fi.supports(torch.float16, 128, 16, frozenset())
    assert "bf16" in fi.supports(torch.bfloat16, 128, 16, frozenset()).reason


def _fake_torch(monkeypatch, *, cuda: str | None, hip: str | None, gpus: int, major: int = 8, minor: int = 0,
                arch: str = "gfx942:sramecc+:xnack-") -> None:
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.version, "hip", hip, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    props = types.SimpleNamespace(name="Fake GPU", total_memory=80 * 2**30, major=major, minor=minor,
                                  multi_processor_count=132, gcnArchName=arch)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (major, minor))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (70 * 2**30, 80 * 2**30))


def test_cuda_probe_on_simulated_builds(monkeypatch):
    import llmctl_cuda.platform as cp

    monkeypatch.setattr(cp, "nvml_info", lambda: {"driver_version": "999.1"})
    _fake_torch(monkeypatch, cuda=None, hip="6.2.1", gpus=1)
    probe = CudaPlatform().probe()
    assert not probe.available and "ROCm" in probe.reason and "llmctl-rocm" in probe.reason
    _fake_torch(monkeypatch, cuda="12.4", hip=None, gpus=0)
    probe = CudaPlatform().probe()
    assert not probe.available and "no NVIDIA GPU" in probe.reason
    _fake_torch(monkeypatch, cuda="12.4", hip=None, gpus=2, major=9, minor=0)
    probe = CudaPlatform().probe()
    assert probe.available and len(probe.devices) == 2
    dev = probe.devices[0]
    assert dev.name == "Fake GPU" and dev.total_memory == 80 * 2**30
    assert dev.capabilities["compute_capability"] == "9.0"
    assert probe.details["driver_version"] == "999.1" and probe.details["cuda_version"] == "12.4"
    assert CudaPlatform().supported_dtypes() == [torch.bfloat16, torch.float16, torch.float32]
    assert CudaPlatform().memory_info(0) == (70 * 2**30, 80 * 2**30)
    _fake_torch(monkeypatch, cuda="12.4", hip=None, gpus=1, major=7, minor=5)
    assert CudaPlatform().supported_dtypes() == [torch.float16, torch.float32]

    def boom() -> int:
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(torch.cuda, "device_count", boom)
    probe = CudaPlatform().probe()
    assert not probe.available and "driver exploded" in probe.reason


def test_rocm_probe_on_simulated_builds(monkeypatch):
    _fake_torch(monkeypatch, cuda="12.4", hip=None, gpus=1)
    probe = RocmPlatform().probe()
    assert not probe.available and "CUDA 12.4" in probe.reason and "ROCm build" in probe.reason
    _fake_torch(monkeypatch, cuda=None, hip="6.2.1", gpus=0)
    probe = RocmPlatform().probe()
    assert not probe.available and "no AMD GPU" in probe.reason
    _fake_torch(monkeypatch, cuda=None, hip="6.2.1", gpus=1)
    probe = RocmPlatform().probe()
    assert probe.available and probe.devices[0].capabilities["gfx_arch"] == "gfx942"
    assert probe.details["hip_version"] == "6.2.1"
    assert RocmPlatform().supported_dtypes()[0] == torch.bfloat16
    assert RocmPlatform().torch_device(1) == torch.device("cuda:1")
    _fake_torch(monkeypatch, cuda=None, hip="6.2.1", gpus=1, arch="gfx906")
    assert torch.bfloat16 not in RocmPlatform().supported_dtypes()


def test_configure_resolves_gpu_memory_utilization(monkeypatch):
    """CUDA and ROCm share one rule: the env variable becomes the engine's gpu_memory_utilization unless the user
    set it or an explicit kv_cache_memory makes it moot; a bad value fails at configure time, naming the variable."""
    unset = types.SimpleNamespace(kv_cache_memory=None, gpu_memory_utilization=None)
    monkeypatch.delenv("LLMCTL_GPU_MEMORY_UTILIZATION", raising=False)
    for platform in (CudaPlatform(), RocmPlatform()):
        assert platform.configure(unset) == {"gpu_memory_utilization": 0.9}
    monkeypatch.setenv("LLMCTL_GPU_MEMORY_UTILIZATION", "0.75")
    for platform in (CudaPlatform(), RocmPlatform()):
        assert platform.configure(unset) == {"gpu_memory_utilization": 0.75}
        assert platform.configure(types.SimpleNamespace(kv_cache_memory=2**30, gpu_memory_utilization=None)) == {}
        assert platform.configure(types.SimpleNamespace(kv_cache_memory=None, gpu_memory_utilization=0.5)) == {}
    monkeypatch.setenv("LLMCTL_GPU_MEMORY_UTILIZATION", "1.5")
    for platform in (CudaPlatform(), RocmPlatform()):
        with pytest.raises(ValueError, match="LLMCTL_GPU_MEMORY_UTILIZATION"):
            platform.configure(unset)


def test_profile_seam_passes_the_utilization(monkeypatch):
    import llmctl_gpu.platform as rt

    calls = []

    def fake_profile(run_forward, util, **kwargs):
        calls.append((util, kwargs))
        return 12345

    monkeypatch.setattr(rt, "profile_kv_cache_size", fake_profile)
    monkeypatch.setenv("LLMCTL_GPU_MEMORY_UTILIZATION", "0.7")
    geometry = dict(bytes_per_block=10, block_size=16, max_model_len=64)
    for platform in (CudaPlatform(), RocmPlatform()):
        assert platform.profile_kv_cache_bytes(lambda: None, gpu_memory_utilization=0.6, device_index=1,
                                               **geometry) == 12345
        assert platform.profile_kv_cache_bytes(lambda: None, gpu_memory_utilization=None, **geometry) == 12345
    assert calls == [(0.6, {**geometry, "device": 1}), (0.7, {**geometry, "device": 0})] * 2


def test_profile_kv_cache_size_arithmetic_on_simulated_gpu(monkeypatch, caplog):
    """KV = total * utilization - memory in use before the step - the step's activation peak."""
    gib = 2**30
    cuda = torch.cuda
    ran = []
    for name, fn in {"is_available": lambda: True, "current_device": lambda: 0, "synchronize": lambda d=None: None,
                     "empty_cache": lambda: None, "mem_get_info": lambda d=None: (60 * gib, 80 * gib),
                     "memory_allocated": lambda d=None: 16 * gib, "reset_peak_memory_stats": lambda d=None: None,
                     "max_memory_allocated": lambda d=None: 19 * gib}.items():
        monkeypatch.setattr(cuda, name, fn)
    bpb = 2 * gib // 1024
    with caplog.at_level("INFO", logger="llmctl_gpu.profile"):
        kv = profile_kv_cache_size(lambda: ran.append(1), 0.9, bytes_per_block=bpb, block_size=16, max_model_len=4096)
    assert ran == [1]
    assert kv == int(80 * gib * 0.9) - 20 * gib - 3 * gib
    assert f"{kv // bpb} blocks" in caplog.text and "max concurrency" in caplog.text
    assert profile_kv_cache_size(lambda: None, 0.2) == 0  # never negative: core then says it is too small


def test_doctor_checks_run_and_explain(manager):
    checks = {e.item.name: e.item for e in manager.registry.doctor_checks if e.plugin in ("cuda", "rocm")}
    assert {"cuda: driver and CUDA versions", "cuda: flash_attn", "cuda: flashinfer",
            "rocm: HIP version and GPU architectures"} <= set(checks)
    for check in checks.values():
        result = check.run()
        assert result.message
    if CPU_ONLY_TORCH:
        res = checks["cuda: driver and CUDA versions"].run()
        assert not res.ok and "CPU-only" in res.message and res.hint


def test_graph_runner_is_eager_without_gpu():
    static = {"x": torch.zeros(16, 4), "qsl": torch.zeros(17, dtype=torch.int32)}
    runner = CudaGraphRunner(lambda x, qsl: x * 2 + qsl[1:, None], static, extra_rows={"qsl": 1},
                             max_batch_size=8)
    assert runner.batch_sizes == [1, 2, 4, 8]
    runner.capture()
    assert runner.enforce_eager and not runner.graphs and runner.padded_size(3) is None
    x = torch.randn(3, 4)
    qsl = torch.arange(4, dtype=torch.int32)
    torch.testing.assert_close(runner.run(x=x, qsl=qsl), x * 2 + qsl[1:, None])


class _StandInRunner(CudaGraphRunner):
    """The runner's graph API replaced by re-running forward on the captured views (no GPU needed)."""

    def graphs_available(self) -> bool:
        return True

    def _begin_capture(self) -> None:
        pass

    def _capture_one(self, views):
        output = self.forward(**views).clone()
        return (dict(views), output), output

    def _end_capture(self) -> None:
        pass

    def _replay(self, graph) -> None:
        views, output = graph
        output.copy_(self.forward(**views))


def test_graph_runner_copies_pads_and_falls_back():
    static = {"x": torch.zeros(8, 3), "table": torch.zeros(8, 5, dtype=torch.int64),
              "qsl": torch.arange(9, dtype=torch.int32)}
    seen_batches = []

    def forward(x, table, qsl):
        seen_batches.append(x.shape[0])
        return x.sum(1) + table.sum(1) + qsl[1:]

    def pad(views, n, batch):  # qsl stays arange: every row is one token, padded or not
        views["x"][n:].zero_()
        views["table"][n:].zero_()

    runner = _StandInRunner(forward, static, batch_sizes=(4, 1, 2, 16), extra_rows={"qsl": 1}, pad_fn=pad)
    assert runner.batch_sizes == [1, 2, 4]  # 16 does not fit the buffers
    assert runner.padded_size(1) is None  # nothing captured yet
    runner.capture()
    assert sorted(seen_batches) == [1, 2, 4]
    assert [runner.padded_size(n) for n in (0, 1, 2, 3, 4, 5)] == [None, 1, 2, 4, 4, None]

    x = torch.randn(3, 3)
    table = torch.tensor([[1, 2], [3, 4], [5, 6]])  # narrower than the buffer: only its leading columns change
    seen_batches.clear()
    got = runner.run(x=x, table=table)
    assert seen_batches == [4]  # padded up
    torch.testing.assert_close(got, x.sum(1) + table.sum(1) + torch.arange(1, 4, dtype=torch.int32))
    assert torch.equal(static["table"][:3, :2], table) and not static["x"][3].any()
    with pytest.raises(ValueError, match="table"):
        runner.run(x=x, table=torch.zeros(3, 6, dtype=torch.int64))

    seen_batches.clear()
    big = torch.randn(5, 3)
    got = runner.run(x=big, table=torch.ones(5, 5, dtype=torch.int64), qsl=torch.arange(6, dtype=torch.int32))
    assert seen_batches == [5]  # above the largest graph: a plain call on the live tensors
    torch.testing.assert_close(got, big.sum(1) + 5 + torch.arange(1, 6, dtype=torch.int32))


def test_decode_step_runner_built_from_core_spec():
    from llmctl.plugins.types import DecodeGraphSpec, DecodeStepRunner

    def pad(views, n, batch):
        views["x"][n:].zero_()

    spec = DecodeGraphSpec(forward=lambda x: x * 2, static_inputs={"x": torch.zeros(8, 2)},
                           batch_sizes=(1, 2, 4, 8), extra_rows={}, pad_fn=pad)
    for platform in (CudaPlatform(), RocmPlatform()):
        runner = platform.decode_step_runner(spec)
        assert isinstance(runner, CudaGraphRunner) and isinstance(runner, DecodeStepRunner)
        assert runner.batch_sizes == [1, 2, 4, 8] and runner.pad_fn is pad and runner.forward is spec.forward
        if not torch.cuda.is_available():
            runner.capture()
            assert runner.padded_size(1) is None  # no GPU: nothing captured, so core keeps decodes eager


def test_kv_profile_helpers():
    bpb = 2 * 32 * 16 * 8 * 128 * 2
    budget = kv_budget(10 * bpb + 5, bpb, 16, 4096)
    assert budget.num_blocks == 10 and budget.max_concurrency == pytest.approx(10 / (4096 / 16))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a GPU"):
            profile_kv_cache_size(lambda: None)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        profile_kv_cache_size(lambda: None, 1.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _comm_worker(rank: int, world: int, port: int, results) -> None:
    comm = GpuCommunicator("test-gloo", "cpu", backend="gloo")
    comm.init(rank, world, f"tcp://127.0.0.1:{port}")
    try:
        t = torch.full((2, 3), float(rank + 1))
        summed = comm.all_reduce(t.clone())
        gathered0 = comm.all_gather(torch.full((1, 2), float(rank)), dim=0)
        gathered1 = comm.all_gather(torch.full((2, 1), float(rank)), dim=1)
        b = comm.broadcast(torch.full((2,), float(rank + 10)), src=1)
        if rank == 0:
            comm.send(torch.tensor([42.0]), dst=1)
            got = None
        else:
            got = comm.recv(torch.zeros(1), src=0).tolist()
        # all_to_all both ways: all_to_all_single, then the point-to-point pairs a backend without it gets.
        # Rank 0 sends [1 row to itself, 2 to rank 1]; rank 1 sends [none to rank 0, 1 to itself].
        send = [1, 2] if rank == 0 else [0, 1]
        recv = [1, 0] if rank == 0 else [2, 1]
        rows = torch.arange(sum(send), dtype=torch.float32).unsqueeze(1).repeat(1, 2) + 10 * rank
        a2a = [comm.all_to_all(rows, send, recv).tolist()]
        comm._a2a_single = False
        a2a.append(comm.all_to_all(rows, send, recv).tolist())
        comm.barrier()
        results[rank] = (summed.tolist(), gathered0.tolist(), gathered1.tolist(), b.tolist(), got, a2a)
    finally:
        comm.destroy()


def test_communicator_collectives_over_gloo():
    """The shared communicator's logic (gather layout, send/recv) with the gloo backend in two processes;
    on GPUs the same code runs with NCCL/RCCL."""
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    port = _free_port()
    procs = [ctx.Process(target=_comm_worker, args=(r, 2, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    for rank in range(2):
        summed, g0, g1, b, _, a2a = results[rank]
        assert a2a[0] == a2a[1] == ([[0.0, 0.0]] if rank == 0 else [[1.0, 1.0], [2.0, 2.0], [10.0, 10.0]])
        assert summed == [[3.0] * 3] * 2
        assert g0 == [[0.0, 0.0], [1.0, 1.0]]
        assert g1 == [[0.0, 1.0], [0.0, 1.0]]
        assert b == [11.0, 11.0]
    assert results[1][4] == [42.0]
