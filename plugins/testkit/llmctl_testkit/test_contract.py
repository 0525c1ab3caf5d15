"""The backend contract, as tests: ``pytest --pyargs llmctl_testkit --llmctl-platform NAME``.

Each test checks the plugin(s) that provide platform NAME; the failure message names the clause it broke.
Hardware-bound tests skip with the platform's own probe reason when the device is absent, so the
registration clauses can still be checked on a developer laptop.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llmctl.plugins import ProbeResult

from llmctl_testkit import checks
from llmctl_testkit.harness import ContractViolation, require
from llmctl_testkit.pytest_plugin import extra_plugin_modules, get_manager, platform_name

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HEAD_SIZES = (64, 128)
BLOCK_SIZES = (16, 32)
HEADS = ((4, 4), (8, 2))  # (query heads, kv heads): MHA and GQA


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize over what the platform under test registered, so every backend and op gets its own ids."""
    name = platform_name(metafunc.config)
    if "backend_name" in metafunc.fixturenames:
        backends: list = []
        if name:
            backends = sorted(b.name for b in get_manager(metafunc.config).registry.backends_for(name)
                              if b.platform == name)
        if not backends:
            reason = ("needs --llmctl-platform NAME" if not name else
                      f"platform {name!r} registers no attention backend of its own (the core reference applies)")
            backends = [pytest.param("none", marks=pytest.mark.skip(reason=reason))]
        metafunc.parametrize("backend_name", backends)
    if "quant_format" in metafunc.fixturenames:
        formats = sorted(get_manager(metafunc.config).registry.quant_formats_for(name)) if name else []
        if not formats:
            reason = ("needs --llmctl-platform NAME" if not name else
                      f"platform {name!r} registers no quantization kernel (core's reference applies)")
            formats = [pytest.param("none", marks=pytest.mark.skip(reason=reason))]
        metafunc.parametrize("quant_format", formats)
    if "op_name" in metafunc.fixturenames:
        from llmctl.ops.reference import OP_NAMES

        metafunc.parametrize("op_name", OP_NAMES)


def _backend(manager, name: str):
    return manager.registry.attention_backends[name].item


# -- registration ----------------------------------------------------------------------------------------------
def test_platform_registration(testkit_manager, testkit_platform) -> None:
    checks.check_platform_metadata(testkit_platform, testkit_manager.probe(testkit_platform.name))
    info = testkit_manager.plugins[testkit_manager.registry.platforms[testkit_platform.name].plugin]
    require(not info.broken, "registration.plugin", f"plugin {info.name} is broken: {info.error}")


def test_platform_probe_never_raises(testkit_platform) -> None:
    try:
        result = testkit_platform.probe()
    except Exception as exc:  # the manager would swallow it; the contract forbids it
        raise ContractViolation("platform.probe", f"probe() raised {type(exc).__name__}: {exc}") from exc
    require(isinstance(result, ProbeResult), "platform.probe", f"returned {type(result).__name__}")


def test_platform_memory_info(testkit_platform, testkit_device) -> None:
    checks.check_memory_info(testkit_platform)


def test_platform_configure(testkit_platform) -> None:
    checks.check_configure(testkit_platform)


def test_platform_kv_cache_hooks(testkit_manager, testkit_platform, testkit_device) -> None:
    backend = testkit_manager.select_attention_backend(testkit_platform, torch.float32, 64, 16,
                                                       frozenset({"prefix_caching", "chunked_prefill"}))
    checks.check_kv_cache_hooks(testkit_platform, backend, testkit_device)


def test_attention_backend_registration(testkit_manager, testkit_platform, backend_name: str) -> None:
    backend = _backend(testkit_manager, backend_name)
    clause = "registration.attention"
    require(isinstance(backend.name, str) and bool(backend.name), clause, f"backend name {backend.name!r}")
    require(isinstance(backend.priority, int), clause, f"{backend.name}: priority must be an int")
    require(isinstance(backend.supports_graph_capture, bool), "attention.supports_graph_capture",
            f"{backend.name}: supports_graph_capture must be True or False")
    for dtype in DTYPES.values():
        for head_size in (64, 80, 128, 256):
            case = checks.AttentionCase(dtype, head_size, 16, 4, 4, "mixed")
            checks.check_supports(backend, case)
    shape = backend.kv_cache_shape(10, 16, 2, 64)
    require(isinstance(shape, tuple) and all(isinstance(x, int) for x in shape), "attention.kv_cache_shape",
            f"{backend.name}: kv_cache_shape must return a tuple of ints, got {shape!r}")


def test_platform_runs_a_llama(testkit_manager, testkit_platform) -> None:
    """Some attention backend (own or the reference) must accept the most common model shape."""
    try:
        testkit_manager.select_attention_backend(testkit_platform, torch.float32, 64, 16,
                                                 frozenset({"prefix_caching", "chunked_prefill"}))
    except Exception as exc:
        raise ContractViolation("attention.selection", str(exc)) from exc


# -- kernels ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", list(checks.SCENARIOS))
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("block_size", BLOCK_SIZES, ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("head_size", HEAD_SIZES, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_attention(testkit_manager, testkit_platform, testkit_device, backend_name, dtype_name, head_size,
                   block_size, heads, scenario) -> None:
    dtype = DTYPES[dtype_name]
    if dtype not in testkit_platform.supported_dtypes():
        pytest.skip(f"{testkit_platform.name} does not list {dtype} in supported_dtypes()")
    backend = _backend(testkit_manager, backend_name)
    case = checks.AttentionCase(dtype, head_size, block_size, heads[0], heads[1], scenario,
                                seed=head_size + block_size + heads[0])
    support = checks.check_supports(backend, case)
    if not support:
        pytest.skip(f"{backend.name} does not support {case.describe()}: {support.reason}")
    checks.check_attention(backend, testkit_device, case)


@pytest.mark.parametrize("scenario", ["mixed", "padded", "sliding_window"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("head_size", HEAD_SIZES, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("kv_dtype_name", ["int8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_attention_kv8(testkit_manager, testkit_platform, testkit_device, backend_name, dtype_name, kv_dtype_name,
                       head_size, heads, scenario) -> None:
    """Backends that declare an 8-bit KV cache feature read and write it as the reference does."""
    from llmctl.kv.cache_dtype import kv_feature, kv_storage_dtype

    dtype = DTYPES[dtype_name]
    if dtype not in testkit_platform.supported_dtypes():
        pytest.skip(f"{testkit_platform.name} does not list {dtype} in supported_dtypes()")
    backend = _backend(testkit_manager, backend_name)
    kv_dtype = kv_storage_dtype(kv_dtype_name, dtype)
    case = checks.AttentionCase(dtype, head_size, 16, heads[0], heads[1], scenario, seed=head_size + heads[0])
    support = backend.supports(dtype, head_size, 16, checks.case_features(case) | {kv_feature(kv_dtype)})
    if not support:
        pytest.skip(f"{backend.name} does not read {kv_dtype_name} KV caches: {support.reason}")
    checks.check_attention_kv8(backend, testkit_device, case, kv_dtype)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_op_override(testkit_manager, testkit_platform, testkit_device, op_name: str, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    if dtype not in testkit_platform.supported_dtypes():
        pytest.skip(f"{testkit_platform.name} does not list {dtype} in supported_dtypes()")
    ops = testkit_manager.registry.resolve_ops(testkit_platform.name)
    if op_name not in checks.overridden_ops(ops):
        pytest.skip(f"{testkit_platform.name} does not override {op_name}")
    if op_name in ("apply_top_k_top_p", "apply_min_p") and dtype != torch.float32:
        pytest.skip("sampling ops run on float32 logits")
    if op_name == "pack_linear_weight":
        checks.check_packed_linear(ops.pack_linear_weight, ops.linear, testkit_device, dtype)
        return
    if op_name in ("pack_gated_linear_weight", "gated_linear"):
        checks.check_gated_linear(ops.pack_gated_linear_weight, ops.gated_linear, testkit_device, dtype)
        return
    if op_name in ("pack_fused_moe_weights", "fused_moe"):
        checks.check_fused_moe(ops.pack_fused_moe_weights, ops.fused_moe, testkit_device, dtype)
        return
    if op_name == "lora_shrink_expand":
        checks.check_lora_shrink_expand(ops.lora_shrink_expand, testkit_device, dtype)
        return
    checks.check_op(op_name, getattr(ops, op_name), testkit_device, dtype)


# -- quantization kernels ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_quant_kernel(testkit_manager, testkit_platform, testkit_device, quant_format: str, dtype_name: str) -> None:
    from llmctl_testkit.quant_checks import check_quant_kernel

    dtype = DTYPES[dtype_name]
    if dtype not in testkit_platform.supported_dtypes():
        pytest.skip(f"{testkit_platform.name} does not list {dtype} in supported_dtypes()")
    kernel = testkit_manager.registry.quant_methods[f"{quant_format}@{testkit_platform.name}"].item
    if not check_quant_kernel(kernel, testkit_device, dtype):
        pytest.skip(f"{kernel.kernel or kernel.name} accepts none of the {quant_format} test layouts for {dtype}")


# -- communicator ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world_size", [1, 2])
def test_communicator(pytestconfig, testkit_manager, testkit_platform, testkit_device, world_size: int) -> None:
    if testkit_manager.registry.communicator_for(testkit_platform.name) is None:
        pytest.skip(f"{testkit_platform.name} registers no communicator (no tensor parallelism)")
    probe = testkit_manager.probe(testkit_platform.name)
    if testkit_platform.device_type != "cpu" and len(probe.devices) < world_size:
        pytest.skip(f"needs {world_size} devices, {testkit_platform.name} found {len(probe.devices)}")
    cmd = [sys.executable, "-m", "llmctl_testkit.comm_worker", "--platform", testkit_platform.name,
           "--world-size", str(world_size), "--init-method", f"tcp://127.0.0.1:{_free_port()}"]
    for mod in extra_plugin_modules(pytestconfig):
        cmd += ["--extra-plugin", mod]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    procs = [subprocess.Popen(cmd + ["--rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for r in range(world_size)]
    failures = []
    for r, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise ContractViolation("communicator.timeout", f"rank {r} did not finish in 240 s (deadlock?)") from None
        if p.returncode != 0:
            failures.append(f"rank {r} (exit {p.returncode}): {err.strip()[-2000:]}")
    assert not failures, "\n".join(failures)


# -- models and quantization -------------------------------------------------------------------------------------
def test_model_registrations(testkit_manager, testkit_platform) -> None:
    """Model classes the platform's plugin registers for the loader can be built."""
    plugin = testkit_manager.registry.platforms[testkit_platform.name].plugin
    for entry in testkit_manager.registry.models.values():
        if entry.plugin == plugin:
            require(callable(entry.item.model_cls), "registration.model",
                    f"architecture {entry.item.architecture!r}: model_cls is not callable")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_quantization_kernels(testkit_manager, testkit_platform, testkit_device, dtype_name: str) -> None:
    """Every quantization kernel the platform's plugin registers, against core's reference_linear."""
    dtype = DTYPES[dtype_name]
    if dtype not in testkit_platform.supported_dtypes():
        pytest.skip(f"{testkit_platform.name} does not list {dtype} in supported_dtypes()")
    plugin = testkit_manager.registry.platforms[testkit_platform.name].plugin
    methods = [e.item for e in testkit_manager.registry.quant_methods.values() if e.plugin == plugin]
    if not methods:
        pytest.skip(f"{testkit_platform.name} registers no quantization kernel (core's reference applies)")
    for method in methods:
        checks.check_quant_method(method, testkit_device, dtype)


# -- doctor ----------------------------------------------------------------------------------------------------
def test_doctor_checks(testkit_manager, testkit_platform) -> None:
    from llmctl.plugins import DoctorResult

    plugin = testkit_manager.registry.platforms[testkit_platform.name].plugin
    for entry in testkit_manager.registry.doctor_checks:
        if entry.plugin != plugin:
            continue
        try:
            result = entry.item.run()
        except Exception as exc:
            raise ContractViolation("doctor.run", f"check {entry.item.name!r} raised {type(exc).__name__}: "
                                                  f"{exc}") from exc
        require(isinstance(result, DoctorResult), "doctor.run",
                f"check {entry.item.name!r} returned {type(result).__name__}, not DoctorResult")


# -- end to end ------------------------------------------------------------------------------------------------
PROMPTS = [
    [5, 9, 14, 3, 77],
    [10 + (i * 7) % 110 for i in range(21)],
    [3 + (i * 13) % 120 for i in range(40)],
    [3 + (i * 13) % 120 for i in range(32)] + [99, 100, 101],  # shares two blocks with the previous prompt
]


@pytest.fixture(scope="session")
def testkit_tiny_llama(tmp_path_factory) -> Path:
    from llmctl_testkit.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("llmctl-testkit") / "tiny-llama")


def _greedy(llm, prompts: list[list[int]]) -> list[list[int]]:
    from llmctl import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=12)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_end_to_end_greedy(testkit_platform, testkit_device, testkit_tiny_llama) -> None:
    """The platform's whole stack (attention, ops, runner on its device) against the reference attention on
    the CPU: greedy tokens of a tiny random Llama must be identical, first as a batch, then again with the
    prefix cache warm. The engine runs as core runs it: ``configure``, ``profile_kv_cache_bytes`` (no
    ``kv_cache_memory`` given), ``prepare_kv_cache`` and, where the backend declares ``supports_graph_capture``,
    ``decode_step_runner`` with its captured decode steps."""
    try:
        from llmctl import LLM
    except Exception as exc:
        raise ContractViolation("e2e.engine", f"llmctl.LLM is not importable: {type(exc).__name__}: {exc}") from exc
    common = dict(model=str(testkit_tiny_llama), dtype="float32", max_model_len=128, block_size=16,
                  seed=0, enable_prefix_caching=True, max_num_seqs=8)
    try:
        ref_llm = LLM(device="cpu", attention_backend="torch-reference", **common)
        expected = _greedy(ref_llm, PROMPTS) + _greedy(ref_llm, PROMPTS[2:])
        del ref_llm
    except Exception as exc:
        raise ContractViolation("e2e.reference", f"the CPU reference run failed ({type(exc).__name__}: {exc}); "
                                                 f"is a 'cpu' platform installed (llmctl-cpu)?") from exc
    try:
        llm = LLM(device=testkit_platform.name, **common)
        got = _greedy(llm, PROMPTS) + _greedy(llm, PROMPTS[2:])
    except Exception as exc:
        raise ContractViolation("e2e.generate", f"LLM(device={testkit_platform.name!r}) failed: "
                                                f"{type(exc).__name__}: {exc}") from exc
    require(any(len(set(t)) > 1 for t in expected), "e2e.setup",
            f"the reference produced degenerate output {expected}; the comparison would be meaningless")
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if g != e:
            first = next((k for k, (a, b) in enumerate(zip(g, e, strict=False)) if a != b), min(len(g), len(e)))
            raise ContractViolation("e2e.greedy", f"request {i}: greedy tokens differ from the CPU reference "
                                                  f"from position {first}: got {g}, expected {e}")
