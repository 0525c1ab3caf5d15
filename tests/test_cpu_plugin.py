"""The llmctl-cpu plugin: discovery through its entry point, the platform probe, the cpu-sdpa attention backend
against the torch reference (random ragged batches drawn fresh each run), batch invariance, op overrides and
the gloo communicator at world sizes 1 and 2."""

from __future__ import annotations

import itertools
import os
import random
from importlib import metadata

import pytest
import torch
from llmctl.attention import AttentionMetadata
from llmctl.ops import reference
from llmctl.ops.paged_attention import paged_attention_reference, write_kv_reference
from llmctl.plugins import PluginManager

from tests import native_builds

SEED = int(os.environ.get("LLMCTL_TEST_SEED") or random.SystemRandom().randrange(2**31))


@pytest.fixture
def rng() -> random.Random:
    print(f"seed={SEED}")  # shown on failure, so a failing draw can be replayed
    torch.manual_seed(SEED)
    return random.Random(SEED)


@pytest.fixture(scope="module")
def manager() -> PluginManager:
    return PluginManager().load()


def _set_amx(on: bool):
    """Turn the C kernels' AMX paths on or off; returns a function that restores the previous state (skips when
    AMX is asked for and this host has none)."""
    from llmctl_cpu import native

    lib = native.kernels()
    if lib is None:
        pytest.skip(f"CPU C kernels not available: {native.status()[1]}")
    was = lib.amx
    if lib.use_amx(on) != on:
        lib.use_amx(was)
        pytest.skip("no AMX on this host (or Linux refused this process the tile state)")
    return lambda: lib.use_amx(was)


@pytest.fixture(params=["native-amx", "native-avx512", "torch"])
def backend(request, manager, monkeypatch):
    """Every decode/write path: the C kernels (llmctl_cpu.native) on AMX tiles and on AVX-512, and the torch fallback
    used without a compiler."""
    from llmctl_cpu import native

    if request.param == "torch":
        monkeypatch.setattr(native, "kernels", lambda: None)
        yield manager.registry.attention_backends["cpu-sdpa"].item
        return
    restore = _set_amx(request.param == "native-amx")
    yield manager.registry.attention_backends["cpu-sdpa"].item
    restore()


@pytest.fixture(params=["amx", "avx512"])
def isa(request):
    """The C kernels on AMX tiles and on AVX-512 (tests that build the backend from ``manager`` themselves)."""
    restore = _set_amx(request.param == "amx")
    yield request.param
    restore()


# -- discovery and platform ----------------------------------------------------------------------------------------

def test_entry_point_is_the_only_registration(manager):
    eps = {ep.name: ep for ep in metadata.entry_points(group="llmctl.plugins")}
    assert eps["cpu"].value == "llmctl_cpu"
    info = manager.plugins["cpu"]
    assert not info.broken, info.error
    assert info.distribution == "llmctl-cpu" and info.api_version == "2.5"
    assert manager.registry.platforms["cpu"].plugin == "cpu"
    assert manager.registry.attention_backends["cpu-sdpa"].plugin == "cpu"
    assert manager.registry.communicators["gloo"].plugin == "cpu"
    assert manager.select_platform().name == "cpu"
    assert manager.select_platform("cpu").name == "cpu"


def test_disabling_the_plugin_removes_it(monkeypatch):
    monkeypatch.setenv("LLMCTL_DISABLE_PLUGINS", "cpu")
    pm = PluginManager().load()
    assert pm.plugins["cpu"].disabled and "cpu" not in pm.registry.platforms


def test_backend_is_selected_for_cpu(manager):
    plat = manager.select_platform("cpu")
    b = manager.select_attention_backend(plat, torch.bfloat16, 64, 16, frozenset({"sliding_window"}))
    assert b.name == "cpu-sdpa"
    assert not b.supports(torch.float32, 512, 16, frozenset())
    assert not b.supports(torch.float32, 64, 16, frozenset({"alibi"}))
    assert not b.supports(torch.int8, 64, 16, frozenset())


def test_probe_reports_real_hardware(manager):
    from llmctl_cpu.platform import cpu_info

    plat = manager.registry.platforms["cpu"].item
    assert (plat.device_type, plat.priority) == ("cpu", 0)
    probe = plat.probe()
    assert probe.available
    (dev,) = probe.devices
    with open("/proc/cpuinfo") as f:
        text = f.read()
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    if names:
        assert dev.name == names[0]
    caps = dev.capabilities
    assert caps["logical_cores"] == text.count("processor\t:") or not names
    assert 1 <= caps["physical_cores"] <= caps["logical_cores"]
    assert 1 <= caps["usable_physical_cores"] <= caps["physical_cores"]
    flags = cpu_info().flags
    for flag, present in caps["isa"].items():
        assert present == (flag in flags)
    assert isinstance(caps["mkldnn_bf16"], bool)
    free, total = plat.memory_info()
    page = os.sysconf("SC_PAGE_SIZE")
    assert 0 < free <= total <= os.sysconf("SC_PHYS_PAGES") * page * 1.01
    dtypes = plat.supported_dtypes()
    assert dtypes[-1] == torch.float32
    from llmctl_cpu.platform import c_bf16_kernels

    native_bf16 = ("avx512_bf16" in flags or "amx_bf16" in flags) and caps["mkldnn_bf16"]
    assert (torch.bfloat16 in dtypes) == (native_bf16 or c_bf16_kernels())
    assert dtypes[0] == (torch.bfloat16 if torch.bfloat16 in dtypes else torch.float32)  # auto's pick for a GGUF
    # without native bf16 or the C kernels the CPU still runs bfloat16 when a user names it (emulated), never for
    # dtype=auto
    assert plat.emulated_dtypes() == ([] if torch.bfloat16 in dtypes else [torch.bfloat16])


def test_parse_cpuinfo_counts_physical_cores_and_affinity():
    from llmctl_cpu.platform import parse_cpuinfo

    # two sockets x two cores x two SMT threads
    blocks = []
    for cpu in range(8):
        sock, core = cpu // 4, (cpu // 2) % 2
        blocks.append(f"processor\t: {cpu}\nmodel name\t: Fake CPU\nphysical id\t: {sock}\ncore id\t: {core}\n"
                      f"flags\t\t: avx2 avx512f amx_bf16")
    info = parse_cpuinfo("\n\n".join(blocks), allowed={0, 1, 2, 5})
    assert (info.logical_cores, info.physical_cores, info.usable_physical_cores) == (8, 4, 3)
    assert info.has_bf16_isa and info.model_name == "Fake CPU"


def test_configure_fills_only_unset_fields():
    from llmctl.config import EngineArgs
    from llmctl_cpu.platform import CPU_MAX_NUM_BATCHED_TOKENS, CpuPlatform, default_num_threads

    platform = CpuPlatform()
    before = torch.get_num_threads()
    try:
        assert platform.configure(EngineArgs(model="m")) == {"max_num_batched_tokens": CPU_MAX_NUM_BATCHED_TOKENS}
        if not os.environ.get("OMP_NUM_THREADS"):
            assert torch.get_num_threads() == default_num_threads()
        assert platform.configure(EngineArgs(model="m", platform_options={"num_threads": 1},
                                             max_num_batched_tokens=4096)) == {}
        if not os.environ.get("OMP_NUM_THREADS"):
            assert torch.get_num_threads() == 1
        import types

        big_blocks = platform.configure(types.SimpleNamespace(platform_options={"num_threads": 1},
                                                              max_num_batched_tokens=None, block_size=2048))
        assert big_blocks == {"max_num_batched_tokens": 2048}  # never below one block
        with pytest.raises(ValueError, match="^num_threads:"):
            platform.configure(EngineArgs(model="m", platform_options={"num_threads": -2}))
    finally:
        torch.set_num_threads(before)


def test_num_threads_is_a_cpu_platform_option(monkeypatch):
    """``num_threads`` is no core field: ``from_kwargs`` routes it to the platform's options, and a keyword no
    platform declares is still refused by name."""
    from llmctl.config import EngineArgs

    args = EngineArgs.from_kwargs("m", num_threads=3, max_num_seqs=4)
    assert args.platform_options == {"num_threads": 3} and args.max_num_seqs == 4
    with pytest.raises(ValueError, match="^num_thread: unknown engine argument; known: .*num_threads"):
        EngineArgs.from_kwargs("m", num_thread=3)


def test_configure_threads_honours_environment(monkeypatch):
    from llmctl_cpu.platform import configure_threads, default_num_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LLMCTL_CPU_THREADS", "1")
        assert configure_threads() == 1 == torch.get_num_threads()
        monkeypatch.delenv("LLMCTL_CPU_THREADS")
        n = configure_threads()
        assert n == default_num_threads() == torch.get_num_threads()
        assert n <= len(os.sched_getaffinity(0))
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(2)
        assert configure_threads() == 2  # an explicit OMP setting is the user's choice; left alone
    finally:
        torch.set_num_threads(before)


def test_doctor_checks_run(manager):
    checks = {e.item.name: e.item for e in manager.registry.doctor_checks if e.plugin == "cpu"}
    assert {"cpu threads", "cpu bf16", "cpu kernels"} <= set(checks)
    for check in checks.values():
        result = check.run()
        assert result.message


def test_native_kernels_build_into_the_cache_and_degrade_with_a_reason(monkeypatch, tmp_path):
    from llmctl_cpu import native

    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    # what is tested is the cache and the degradation, not the code: an unoptimised build keys and loads the same way
    monkeypatch.setattr(native, "CFLAGS", tuple("-O0" if f == "-O3" else f for f in native.CFLAGS))
    native._load.cache_clear()
    try:
        if native._compiler() is not None:
            ok, why = native.status()
            assert ok, why
            assert list((tmp_path / "cpu-kernels").glob("kernels-*.so")), "the build is cached under LLMCTL_CACHE_DIR"
            native._load.cache_clear()
            assert native.status()[0]  # a second load reuses the cached object
        native._load.cache_clear()
        monkeypatch.setenv(native.DISABLE_ENV, "0")
        assert native.status() == (False, f"disabled by {native.DISABLE_ENV}=0") and native.kernels() is None
        monkeypatch.delenv(native.DISABLE_ENV)
        native._load.cache_clear()
        monkeypatch.setattr(native, "_compiler", lambda: None)
        ok, why = native.status()
        assert not ok and "no C compiler" in why
        native._load.cache_clear()
        monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")
        ok, why = native.status()
        assert not ok and "build failed" in why
    finally:
        native._load.cache_clear()


@pytest.mark.parametrize("target", native_builds.TARGETS)
def test_kernels_compile_for_hosts_without_amx(target):
    """The kernels build with -march=native, so this host only compiles its own paths; older x86 hosts (AVX2 only,
    AVX-512 without bf16, AVX512-BF16 without AMX) must build too, warning-free, or they silently lose every C
    kernel. (A target this host cannot execute is compiled at -O1 here: see native_builds._compile.)"""
    done = native_builds.build(target, alongside=native_builds.TARGETS)
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("target", ["x86-64", "x86-64-v3", "skylake-avx512"])
def test_float32_gemm_of_other_builds_is_batch_invariant(rng, target):
    """The float32 C GEMM as an AVX2-only host (x86-64-v3), an AVX-512 host and a generic x86-64 build (no GEMM:
    the engine falls back) compile it, run here where this CPU can execute that build."""
    lib = native_builds.runnable(target)
    if target == "x86-64":
        assert not lib.has_gemm_f32
        return
    assert lib.has_gemm_f32
    for n, k in ((33, 17), (576, 96)):
        weight, bias = torch.randn(n, k), torch.randn(n)
        panels = lib.pack_f32_panels(weight)
        x = torch.randn(70, k)
        full = lib.gemm_f32(x, panels, n, bias)
        want = x.double() @ weight.double().T + bias.double()
        assert torch.allclose(full.double(), want, rtol=1e-5, atol=1e-5 * k ** 0.5)
        for m in (1, 3, 5, 64, rng.randint(1, 69)):
            assert torch.equal(lib.gemm_f32(x[:m], panels, n, bias), full[:m]), (target, n, k, m)
        assert torch.equal(lib.gemm_f32(x[69:], panels, n, bias), full[69:])


@pytest.mark.parametrize("target", ["x86-64", "x86-64-v3", "skylake-avx512", "cooperlake"])
def test_bf16_gemm_of_other_builds(rng, target):
    """The bf16 GEMM as each x86 host kind builds it, run here where this CPU can execute that build: AVX2 + FMA
    (x86-64-v3) and AVX-512 without bf16 dot products (skylake-avx512) convert bf16 to float32 in registers,
    AVX512-BF16 (cooperlake) uses its dot products, a generic x86-64 build has none (oneDNN runs bf16 linears).
    Each: within bf16 rounding of the float32 product, batch-invariant, and its SiLU epilogue bit-identical to its
    own unfused GEMM followed by torch's silu_and_mul."""

    from llmctl_cpu.ops import _interleave_gate_up
    from llmctl_cpu.ops import silu_and_mul as cpu_silu_and_mul

    lib = native_builds.runnable(target)
    if target == "x86-64":
        assert not lib.has_gemm_bf16
        return
    assert lib.has_gemm_bf16
    lib.use_amx(False)
    for n, k in ((33, 17), (64, 96), (200, 577)):
        weight, bias = torch.randn(n, k).bfloat16(), torch.randn(n).bfloat16()
        panels = lib.pack_bf16_panels(weight)
        x = torch.randn(70, k).bfloat16()
        for b in (None, bias):
            full = lib.gemm_bf16(x, panels, n, b)
            want = x.float() @ weight.float().T + (0 if b is None else b.float())
            assert torch.allclose(full.float(), want, rtol=2 ** -8, atol=1e-4 * k ** 0.5), (target, n, k)
            for m in (1, 3, 4, 5, 64, rng.randint(1, 69)):
                assert torch.equal(lib.gemm_bf16(x[:m], panels, n, b), full[:m]), (target, n, k, m)
        if n % 32 == 0:
            gated = lib.pack_bf16_panels(_interleave_gate_up(weight).contiguous())
            fused_bias = _interleave_gate_up(bias).contiguous()
            assert torch.equal(lib.gemm_bf16_silu(x, gated, n, fused_bias),
                               cpu_silu_and_mul(lib.gemm_bf16(x, panels, n, bias))), (target, n, k)


# -- attention -----------------------------------------------------------------------------------------------------

def make_batch(rng: random.Random, specs: list[tuple[int, int]], block_size: int, kv_heads: int, heads: int,
               head_size: int, dtype: torch.dtype, extra_blocks: int = 3):
    """``specs``: (context_len, query_len) per sequence. Blocks are handed out shuffled, and the cache is filled
    with random values so stale slots are not zeros; the new tokens are written with the reference."""
    need = [-(-(c + q) // block_size) for c, q in specs]
    num_blocks = sum(need) + extra_blocks
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    width = max(need) + rng.randint(0, 2)
    tables = torch.zeros(len(specs), width, dtype=torch.int32)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_size).to(dtype)
    slots = []
    for i, ((ctx, q), nb) in enumerate(zip(specs, need, strict=True)):
        ids = [pool.pop() for _ in range(nb)]
        tables[i, :nb] = torch.tensor(ids, dtype=torch.int32)
        slots += [ids[p // block_size] * block_size + p % block_size for p in range(ctx, ctx + q)]
    q_lens = [q for _, q in specs]
    seq_lens = [c + q for c, q in specs]
    n_tok = sum(q_lens)
    md = AttentionMetadata(
        num_tokens=n_tok, num_seqs=len(specs),
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64), max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        block_size=block_size, query_lens_cpu=q_lens, seq_lens_cpu=seq_lens)
    key = torch.randn(n_tok, kv_heads, head_size).to(dtype)
    value = torch.randn(n_tok, kv_heads, head_size).to(dtype)
    write_kv_reference(key, value, cache, md.slot_mapping)
    query = torch.randn(n_tok, heads, head_size).to(dtype)
    return query, cache, md


def random_specs(rng: random.Random, n: int) -> list[tuple[int, int]]:
    specs = []
    for _ in range(n):
        kind = rng.choice(["decode", "prefill", "chunk"])
        if kind == "decode":
            specs.append((rng.randint(0, 300), 1))
        elif kind == "prefill":
            specs.append((0, rng.randint(2, 70)))
        else:  # a later chunk (or prefix-cache hit): earlier context comes from the cache
            specs.append((rng.randint(1, 200), rng.randint(2, 40)))
    return specs


TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group,head_size", [(1, 64), (2, 128), (4, 64)])
def test_forward_matches_reference(backend, rng, dtype, block_size, group, head_size):
    kv_heads = rng.choice([1, 2, 3])
    window = rng.choice([None, None, rng.randint(1, 64)])
    specs = random_specs(rng, rng.randint(1, 9))
    query, cache, md = make_batch(rng, specs, block_size, kv_heads, kv_heads * group, head_size, dtype)
    scale = head_size ** -0.5
    expect = paged_attention_reference(query, cache, md, scale, window)
    out = torch.full_like(query, float("nan"))
    got = backend.forward(query, cache, md, scale, window, out=out)
    assert got is out
    assert not got.isnan().any(), "some output rows were not written"
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), expect.float(), atol=atol, rtol=rtol, msg=f"specs={specs} w={window}")


@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_forward_without_out_and_all_decode(backend, rng, kind):
    specs = [(rng.randint(0, 200), 1) for _ in range(rng.randint(1, 12))]
    if kind == "mixed":
        specs.append((rng.randint(0, 50), rng.randint(2, 30)))
    query, cache, md = make_batch(rng, specs, 16, 2, 6, 64, torch.float32)
    got = backend.forward(query, cache, md, 0.125)
    torch.testing.assert_close(got, paged_attention_reference(query, cache, md, 0.125), atol=2e-5, rtol=2e-5)


def test_long_prefill_is_tiled(backend, rng, monkeypatch):
    import llmctl_cpu.attention as att

    monkeypatch.setattr(att, "QUERY_TILE", 16)
    specs = [(rng.randint(0, 40), rng.randint(17, 70)), (0, 1), (rng.randint(0, 9), rng.randint(2, 50))]
    query, cache, md = make_batch(rng, specs, 16, 2, 4, 64, torch.float32)
    for window in (None, 20):
        out = torch.full_like(query, float("nan"))
        got = backend.forward(query, cache, md, 0.125, sliding_window=window, out=out)
        expect = paged_attention_reference(query, cache, md, 0.125, sliding_window=window)
        torch.testing.assert_close(got, expect, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_prefills_split_between_the_c_kernel_and_flash(backend, rng, monkeypatch, dtype):
    """With the C kernels, short float32 prefill chunks (and bf16 ones under a sliding window) run as per-row
    decodes and longer ones on the flash kernel, in one step; other bf16 chunks all run in the query-tiled
    kernel. Every path agrees with the reference, windows included."""
    import llmctl_cpu.attention as att

    monkeypatch.setattr(att, "NATIVE_PREFILL_MAX_LEN", 40)
    specs = [(0, rng.randint(41, 90)), (rng.randint(1, 30), rng.randint(2, 9)), (rng.randint(30, 60), 1),
             (rng.randint(20, 50), rng.randint(20, 40)), (0, rng.randint(2, 30))]
    rng.shuffle(specs)
    query, cache, md = make_batch(rng, specs, 16, 2, 6, 64, dtype)
    for window in (None, rng.randint(5, 30)):
        md.plan_cache.clear()
        out = torch.full_like(query, float("nan"))
        got = backend.forward(query, cache, md, 0.125, window, out=out)
        assert not got.isnan().any()
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(got.float(), paged_attention_reference(query, cache, md, 0.125, window).float(),
                                   atol=atol, rtol=rtol, msg=f"specs={specs} window={window}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_kernel_prefill_rows_equal_decodes(manager, rng, dtype, isa):
    """In float32 a prefill row is a decode over its prefix in the C kernel, so a prompt's last token gives the same
    bits whether it is computed in a prefill, in a later chunk, or as a decode. bfloat16 prefills run in query
    tiles (keys in vector lanes, probabilities rounded to bf16 for P.V): equal within bf16 rounding."""
    from llmctl_cpu import native

    if not native.status()[0]:
        pytest.skip(f"CPU C kernels not available: {native.status()[1]}")
    backend = manager.registry.attention_backends["cpu-sdpa"].item
    ctx, q_len = rng.randint(10, 80), rng.randint(2, 30)
    query, cache, md = make_batch(random.Random(4), [(ctx, q_len)], 16, 2, 6, 64, dtype)
    whole = backend.forward(query, cache, md, 0.125)
    last_q, _, md_last = make_batch(random.Random(5), [(ctx + q_len - 1, 1)], 16, 2, 6, 64, dtype)
    last_q[0] = query[-1]
    cache_last = torch.zeros_like(cache)
    for p in range(ctx + q_len):
        src = cache[:, int(md.block_tables[0, p // 16]), p % 16]
        cache_last[:, int(md_last.block_tables[0, p // 16]), p % 16] = src
    alone = backend.forward(last_q, cache_last, md_last, 0.125)[0]
    if dtype == torch.float32:
        assert torch.equal(alone, whole[-1])
    else:
        torch.testing.assert_close(alone.float(), whole[-1].float(), atol=1e-2, rtol=2 ** -7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_new_kv_arguments_give_the_cache_read_result(backend, rng, dtype):
    """Core may pass the step's new keys/values; prefill chunks without context then skip the cache read, and
    the result is bit-identical to reading them back (also when the activations are wider than the cache)."""
    specs = [(0, rng.randint(2, 90)), (rng.randint(1, 100), 1), (rng.randint(1, 80), rng.randint(2, 30)),
             (0, rng.randint(2, 20)), (0, 1)]
    rng.shuffle(specs)
    query, cache, md = make_batch(rng, specs, 16, 2, 6, 64, dtype)
    wide = torch.randn(md.num_tokens, 2, 2, 64)  # float32 activations, the cache rounds them to its dtype
    write_kv_reference(wide[:, 0], wide[:, 1], cache, md.slot_mapping)
    for window in (None, rng.randint(1, 40)):
        plain = backend.forward(query, cache, md, 0.125, window)
        given = backend.forward(query, cache, md, 0.125, window, key=wide[:, 0], value=wide[:, 1])
        assert torch.equal(plain, given), f"specs={specs} window={window}"
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(given.float(), paged_attention_reference(query, cache, md, 0.125, window).float(),
                                   atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stale_nan_slots_do_not_leak(backend, rng, dtype):
    """Unused cache slots (uninitialised memory, or blocks freed mid-sequence) may hold NaN/inf; padding keys of
    the decode buckets and of the context gathers must never read them into a result."""
    specs = [(rng.randint(0, 70), 1) for _ in range(5)] + [(rng.randint(1, 50), rng.randint(2, 20)), (0, 7)]
    query, cache, md = make_batch(rng, specs, 16, 2, 4, 64, dtype)
    used = torch.zeros(cache.shape[1] * 16, dtype=torch.bool)
    for i, seq_len in enumerate(md.seq_lens.tolist()):
        pos = torch.arange(seq_len)
        used[md.block_tables[i].long()[pos // 16] * 16 + pos % 16] = True
    flat = cache.view(2, -1, 2, 64)
    flat[:, ~used] = float("nan")
    flat[1, ~used] = float("inf")
    for window in (None, 9):
        got = backend.forward(query, cache, md, 0.125, window)
        assert not got.isnan().any() and not got.isinf().any()
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(got.float(), paged_attention_reference(query, cache, md, 0.125, window).float(),
                                   atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_reference(backend, rng, dtype):
    num_blocks, block_size, kv_heads, head_size = 12, 16, 3, 64
    n = rng.randint(1, num_blocks * block_size // 2)
    slots = torch.tensor(rng.sample(range(num_blocks * block_size), n), dtype=torch.int64)
    slots[torch.rand(n) < 0.2] = -1
    key = torch.randn(n, kv_heads, head_size)
    value = torch.randn(n, kv_heads, head_size)
    base = torch.randn(2, num_blocks, block_size, kv_heads, head_size).to(dtype)
    ours, ref = base.clone(), base.clone()
    backend.write_kv(key, value, ours, slots)
    write_kv_reference(key, value, ref, slots)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, base) or bool((slots < 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group,head_size", [(1, 64), (3, 64), (4, 128)])
def test_batch_invariance(backend, rng, dtype, group, head_size):
    """A sequence's output is bit-identical alone and inside batches of much longer sequences."""
    kv_heads = 2
    window = rng.choice([None, rng.randint(8, 100)])
    target = [(rng.randint(0, 120), 1), (rng.randint(0, 60), rng.randint(2, 9)), (0, rng.randint(2, 40))]
    others = [(rng.randint(500, 900), 1), (rng.randint(300, 700), rng.randint(60, 200)), (0, rng.randint(100, 300)),
              (rng.randint(0, 50), 1)]
    for spec in target:
        alone_specs = [spec]
        batch_specs = others[:2] + [spec] + others[2:]
        q1, c1, m1 = make_batch(random.Random(1), alone_specs, 16, kv_heads, kv_heads * group, head_size, dtype)
        q2, c2, m2 = make_batch(random.Random(2), batch_specs, 16, kv_heads, kv_heads * group, head_size, dtype)
        # copy the target's query and context into its place in the big batch
        s1, s2 = 0, int(m2.query_start_loc[2])
        n_q = spec[1]
        q2[s2:s2 + n_q] = q1[s1:s1 + n_q]
        seq_len = sum(spec)
        for p in range(seq_len):
            b1, o1 = int(m1.block_tables[0, p // 16]), p % 16
            b2, o2 = int(m2.block_tables[2, p // 16]), p % 16
            c2[:, b2, o2] = c1[:, b1, o1]
        alone = backend.forward(q1, c1, m1, head_size ** -0.5, window)
        batched = backend.forward(q2, c2, m2, head_size ** -0.5, window)
        assert torch.equal(alone, batched[s2:s2 + n_q]), f"spec={spec} window={window}"
        # and the all-decode fast path agrees bitwise with the decode group of a mixed batch
        if n_q == 1:
            dq, dc, dm = make_batch(random.Random(3), [others[0], spec, others[3]], 16, kv_heads,
                                    kv_heads * group, head_size, dtype)
            dq[1] = q1[0]
            for p in range(seq_len):
                dc[:, int(dm.block_tables[1, p // 16]), p % 16] = c1[:, int(m1.block_tables[0, p // 16]), p % 16]
            assert torch.equal(alone, backend.forward(dq, dc, dm, head_size ** -0.5, window)[1:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_soft_capped_attention_matches_reference(backend, rng, dtype, monkeypatch):
    """Gemma 2's ``logits_soft_cap``: decodes, prefills and later chunks (with and without a window) equal the
    reference within the dtype's tolerance, in the C kernel where it takes the dtype (the reference is not called),
    and the cap changes the result (a kernel that ignored it would fail)."""
    from llmctl_cpu import attention as cpu_attention
    from llmctl_cpu import native

    native_dtype = native.kernels() is not None and dtype is not torch.float16
    if native_dtype:
        def no_reference(*args, **kwargs):
            raise AssertionError("the soft-capped attention fell back to the torch reference")
        monkeypatch.setattr(cpu_attention, "paged_attention_reference", no_reference)
    for _ in range(3):
        window = rng.choice([None, rng.randint(4, 64)])
        cap = rng.choice([1.0, 2.5])
        specs = random_specs(rng, rng.randint(1, 7))
        query, cache, md = make_batch(rng, specs, 16, 2, 4, 64, dtype)
        query = query * 3  # scores well past the cap
        expect = paged_attention_reference(query, cache, md, 0.125, window, logits_soft_cap=cap)
        uncapped = paged_attention_reference(query, cache, md, 0.125, window)
        out = torch.full_like(query, float("nan"))
        got = backend.forward(query, cache, md, 0.125, window, out=out, logits_soft_cap=cap)
        assert got is out and not got.isnan().any()
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(got.float(), expect.float(), atol=atol, rtol=rtol, msg=f"specs={specs} w={window}")
        assert (expect.float() - uncapped.float()).abs().max() > 10 * atol


def test_soft_capped_rows_do_not_depend_on_the_batch_or_chunking(backend, rng):
    """A capped sequence's rows are bit-identical alone, in a batch, and with its prompt split into two chunks."""
    from llmctl_cpu import native

    if native.kernels() is None:
        pytest.skip("the C kernels are not built")
    spec = (rng.randint(20, 80), rng.randint(10, 30))
    q1, c1, m1 = make_batch(random.Random(1), [spec], 16, 2, 4, 64, torch.bfloat16)
    alone = backend.forward(q1, c1, m1, 0.125, None, logits_soft_cap=2.0)
    ctx, n_q = spec
    split = n_q // 2
    first = AttentionMetadata(
        num_tokens=split, num_seqs=1, query_start_loc=torch.tensor([0, split], dtype=torch.int32),
        seq_lens=torch.tensor([ctx + split], dtype=torch.int32), block_tables=m1.block_tables,
        slot_mapping=m1.slot_mapping[:split], max_query_len=split, max_seq_len=ctx + split, block_size=16,
        query_lens_cpu=[split], seq_lens_cpu=[ctx + split])
    got_first = backend.forward(q1[:split], c1, first, 0.125, None, logits_soft_cap=2.0)
    assert torch.equal(got_first, alone[:split])
    specs = [(rng.randint(300, 600), 1), spec, (0, rng.randint(40, 90))]
    q2, c2, m2 = make_batch(random.Random(2), specs, 16, 2, 4, 64, torch.bfloat16)
    s2 = int(m2.query_start_loc[1])
    q2[s2:s2 + n_q] = q1
    for p in range(sum(spec)):
        c2[:, int(m2.block_tables[1, p // 16]), p % 16] = c1[:, int(m1.block_tables[0, p // 16]), p % 16]
    batched = backend.forward(q2, c2, m2, 0.125, None, logits_soft_cap=2.0)
    assert torch.equal(batched[s2:s2 + n_q], alone)


# -- op overrides --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("neox", [True, False])
def test_rotary_override_is_bit_identical_to_reference(manager, rng, dtype, neox):
    """The C rotary kernel on views into a fused qkv output (row stride > heads * D), with full and partial
    rotary, equals the torch reference bit for bit; shapes it does not take fall back to the reference."""
    from llmctl_cpu import native
    from llmctl_cpu.ops import rotary_embedding

    if not native.status()[0]:
        pytest.skip(f"CPU C kernels not available: {native.status()[1]}")
    max_pos = 4096
    # every vector path (half a multiple of 16) and the scalar one (d=32, rot=16), one thread and several
    for (heads, kv_heads, d), rot_div, t in itertools.product([(9, 3, 64), (4, 4, 128), (8, 1, 32)], (1, 2),
                                                              (rng.randint(1, 70), 200)):
        rot = d // rot_div
        qkv = (torch.randn(t, (heads + 2 * kv_heads) * d) * 3).to(dtype)
        q, k, _ = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q, k = q.view(t, heads, d), k.view(t, kv_heads, d)
        positions = torch.randint(0, max_pos, (t,))
        cos_sin = torch.randn(max_pos, rot)
        got_q, got_k = rotary_embedding(positions, q, k, cos_sin, neox)
        want_q, want_k = reference.rotary_embedding(positions, q, k, cos_sin, neox)
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k), (heads, d, rot, t)
    with pytest.raises(IndexError, match="positions"):
        rotary_embedding(torch.full((t,), max_pos), q, k, cos_sin, neox)
    odd = q.transpose(0, 1).contiguous().transpose(0, 1)  # heads not contiguous: the reference path
    assert torch.equal(rotary_embedding(positions, odd, k, cos_sin, neox)[0], want_q)


def test_native_write_kv_rejects_slots_outside_the_cache(backend):
    cache = torch.zeros(2, 4, 16, 2, 64)
    key = torch.randn(3, 2, 64)
    with pytest.raises(IndexError, match="slot_mapping"):
        backend.write_kv(key, key, cache, torch.tensor([0, 5, 4 * 16]))
    assert not cache.any(), "nothing may be written when a slot is out of range"


def _assert_norm_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, normed: torch.Tensor,
                       weight: torch.Tensor, eps: float) -> None:
    """``want`` is the float32 reference; ``normed`` is the tensor that was normalised (the residual sum when
    fused). An element may differ from the reference by a bf16 ulp or two when the sum of squares adds in another
    order; the count of such elements is bounded, except where the kernel agrees with the float64 result (there
    the float32 reference is the less accurate one, which happens when a row's rms sits near a rounding edge)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if dtype == torch.float32:
        assert torch.equal(got, want)
        return
    # one bf16 ulp (at most 2^-7 relative) on the normalised value, carried through the weight's multiply and
    # its rounding: at most two ulps of the output
    diff = (got.float() - want.float()).abs()
    ulp = want.float().abs().clamp_min(1e-30) * 2 ** -7
    assert bool((diff <= 2 * ulp).all()), float((diff / ulp).max())
    xd = normed.double()
    exact = weight * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    off = (diff > 0) & (got != exact)
    assert int(off.sum()) <= max(2, got.numel() // 500), int(off.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_overrides_match_reference(manager, rng, dtype):
    # check this plugin's registrations themselves (other installed plugins may also override ops for cpu)
    mine = {e.item.name: e.item for e in manager.registry.ops if e.plugin == "cpu"}
    assert set(mine) == {"rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding",
                         "pack_linear_weight", "linear", "pack_gated_linear_weight", "gated_linear",
                         "greedy_sample", "lora_shrink_expand",  # the LoRA kernel: tests/test_lora_kernels.py
                         "pack_fused_moe_weights", "fused_moe",  # the MoE kernel: tests/test_cpu_moe.py
                         "sampled_logprobs", "sample_softmax"}  # tests/test_sampled_logprobs.py
    assert all(op.platform == "cpu" for op in mine.values())
    ops = {name: op.fn for name, op in mine.items()}
    rows, width = rng.randint(1, 300), rng.choice([64, 576, 1000])
    x = (torch.randn(rows, width) * rng.uniform(0.1, 10)).to(dtype)
    res = torch.randn(rows, width).to(dtype)
    w = (torch.rand(width) + 0.5).to(dtype)
    eps = rng.choice([1e-5, 1e-6])
    # float32 (and any platform without the C kernels) is bit-identical; the C bfloat16 RMSNorm sums squares in
    # another order, which moves rare elements by a bf16 ulp or two
    _assert_norm_close(ops["rms_norm"](x, w, eps), reference.rms_norm(x, w, eps), dtype, x, w, eps)
    res_before = res.clone()
    got, got_res = ops["fused_add_rms_norm"](x, res, w, eps)
    want, want_res = reference.fused_add_rms_norm(x, res_before, w, eps)
    _assert_norm_close(got, want, dtype, want_res, w, eps)
    assert torch.equal(got_res, want_res) and torch.equal(res, res_before)
    y = torch.randn(rows, 2 * width).to(dtype)
    assert torch.equal(ops["silu_and_mul"](y), reference.silu_and_mul(y))
    # linear on a plain weight is the reference; on a packed (bf16) weight it agrees within bf16 rounding
    weight, bias = torch.randn(96, width).to(dtype), torch.randn(96).to(dtype)
    assert torch.equal(ops["linear"](x, weight, bias), reference.linear(x, weight, bias))
    packed = ops["pack_linear_weight"](weight)
    from llmctl_cpu import f32_linear, native
    from llmctl_cpu.ops import _onednn, _onednn_bf16
    from llmctl_cpu.packed_weight import PackedFormat, PackedWeight

    lib = native.kernels()
    f32_path = f32_linear.path_for(weight) if dtype == torch.float32 else None
    if dtype == torch.bfloat16 and lib is not None and lib.has_gemm_bf16:
        assert isinstance(packed, PackedWeight) and packed.format is PackedFormat.BF16_PANELS  # the C GEMM's panels
        assert packed.shape == (96, width)
    elif f32_path == "mkl":
        assert packed.format is PackedFormat.MKL_F32 and packed.shape == (96, width)  # MKL's (self-check passed)
    elif f32_path == "c":
        assert packed.format is PackedFormat.F32_PANELS and packed.shape == (96, width)  # the float32 C GEMM
    else:
        assert packed.is_mkldnn == (_onednn_bf16() if dtype == torch.bfloat16 else _onednn())  # oneDNN's layout
    want = reference.linear(x.float(), weight.float(), bias.float())
    got = ops["linear"](x, packed, bias).float()
    assert got.shape == want.shape
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max()))
    x3 = x.reshape(1, rows, width)  # leading dims are kept, as F.linear does
    assert ops["linear"](x3, packed, None).shape == (1, rows, 96)


# -- gloo communicator ---------------------------------------------------------------------------------------------

def test_gloo_world_size_one_leaves_torch_distributed_alone(manager):
    import torch.distributed as dist

    comm = type(manager.registry.communicators["gloo"].item)()
    comm.init(0, 1, "env://")
    t = torch.randn(3, 4)
    assert comm.all_reduce(t.clone()).equal(t)
    assert comm.all_gather(t, dim=1).equal(t)
    assert comm.broadcast(t.clone()).equal(t)
    comm.barrier()
    with pytest.raises(ValueError):
        comm.send(t, 0)
    comm.destroy()
    comm.destroy()
    assert not dist.is_initialized()


def _gloo_worker(rank: int, world: int, init_method: str, results: str) -> None:
    from llmctl_cpu.communicator import GlooCommunicator

    comm = GlooCommunicator(timeout_s=30)
    comm.init(rank, world, init_method)
    try:
        torch.manual_seed(100 + rank)
        mine = torch.randn(2, 3)
        summed = comm.all_reduce(mine.clone())
        gathered = comm.all_gather(mine, dim=1)
        b = torch.full((4,), float(rank + 7))
        comm.broadcast(b, src=1)
        if rank == 0:
            comm.send(torch.arange(5.0) * 3, dst=1)
            got = torch.zeros(5)
        else:
            got = comm.recv(torch.zeros(5), src=0)
        comm.barrier()
        torch.save({"mine": mine, "sum": summed, "gathered": gathered, "b": b, "got": got}, f"{results}.{rank}")
    finally:
        comm.destroy()


def test_gloo_two_processes(tmp_path):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_gloo_worker, args=(2, init, str(tmp_path / "out")), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"out.{i}") for i in range(2)]
    total = r[0]["mine"] + r[1]["mine"]
    for i in range(2):
        torch.testing.assert_close(r[i]["sum"], total)
        assert torch.equal(r[i]["gathered"], torch.cat([r[0]["mine"], r[1]["mine"]], dim=1))
        assert torch.equal(r[i]["b"], torch.full((4,), 8.0))
    assert torch.equal(r[1]["got"], torch.arange(5.0) * 3)


def test_decode_plan_is_shared_by_layers_and_batch_invariant_in_a_full_bucket(backend, rng):
    """The step's decode plan is built once (in ``metadata.plan_cache``) and reused by every layer; a decode is
    bit-identical alone and inside a full bucket of same-length decodes (whole-block gather, zeroed padding)."""
    ctx = rng.randint(100, 140)
    specs = [(ctx + rng.randint(0, 3), 1) for _ in range(64)]
    query, cache, md = make_batch(rng, specs, 16, 3, 9, 64, torch.bfloat16)
    first = backend.forward(query, cache, md, 0.125)
    (plan,) = md.plan_cache.values()
    assert backend.forward(query, cache, md, 0.125).equal(first) and md.plan_cache[next(iter(md.plan_cache))] is plan
    q1, c1, m1 = make_batch(random.Random(1), [specs[5]], 16, 3, 9, 64, torch.bfloat16)
    q1[0] = query[5]
    for p in range(sum(specs[5])):
        c1[:, int(m1.block_tables[0, p // 16]), p % 16] = cache[:, int(md.block_tables[5, p // 16]), p % 16]
    assert torch.equal(backend.forward(q1, c1, m1, 0.125)[0], first[5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_buckets_and_chunks_rows(rng, dtype):
    """Packed GEMMs run at bucketed row counts (bounded oneDNN primitive shapes) and in CHUNK_ROWS pieces; every
    row count gives the reference result."""
    from llmctl_cpu.ops import CHUNK_ROWS, _bucket_sizes, linear, pack_linear_weight, padded_rows

    assert len(_bucket_sizes()) <= 24 and all(1 <= padded_rows(m) - m + 1 <= 16 for m in range(1, CHUNK_ROWS + 1))
    weight, bias = torch.randn(40, 96).to(dtype), torch.randn(40).to(dtype)
    packed = pack_linear_weight(weight)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for m in (1, 7, 9, 250, CHUNK_ROWS + 1, 2 * CHUNK_ROWS + rng.randint(1, 100)):
        x = torch.randn(m, 96).to(dtype)
        got = linear(x, packed, bias)
        want = reference.linear(x.float(), weight.float(), bias.float())
        assert got.shape == (m, 40) and got.dtype == dtype
        assert torch.allclose(got.float(), want, rtol=tol, atol=tol * float(want.abs().max()))
    x = torch.randn(3, 5, 96).to(dtype)  # leading dims kept
    assert linear(x, packed, None).shape == (3, 5, 40)


# -- the C bf16 GEMM -------------------------------------------------------------------------------------------------

def _gemm_lib():
    from llmctl_cpu import native

    lib = native.kernels()
    if lib is None or not lib.has_gemm_bf16:
        pytest.skip("no C bf16 GEMM on this host (needs the native kernels and AVX512-BF16 or AVX2 + FMA)")
    return lib


@pytest.fixture(params=["avx512", "amx"])
def gemm_path(request):
    """Each C GEMM test once on the AVX-512 loop and once on AMX tiles (where the host has AMX): both read the same
    packed panels, and k not a multiple of 32 stays on AVX-512 either way."""
    _gemm_lib()
    restore = _set_amx(request.param == "amx")
    yield request.param
    restore()


@pytest.mark.parametrize(("n", "k"), [(1, 1), (15, 2), (16, 3), (17, 64), (70, 577), (130, 96), (48, 576),
                                      (200, 32)])
def test_c_gemm_matches_float32_math(rng, gemm_path, n, k):
    """Every panel/row remainder (the AMX path's overlapping last row block too) and odd k: within bf16 rounding of
    the float32 product, bias added before rounding."""
    from llmctl_cpu.ops import linear, pack_linear_weight
    from llmctl_cpu.packed_weight import PackedFormat

    weight, bias = torch.randn(n, k).bfloat16(), torch.randn(n).bfloat16()
    packed = pack_linear_weight(weight)
    assert packed.format is PackedFormat.BF16_PANELS and packed.shape == (n, k)
    for m in (1, 2, 3, 4, 5, 9, 16, 17, 33, 64, 256, 273, rng.randint(10, 600)):  # 256+: threads split rows
        x = torch.randn(m, k).bfloat16()
        for b in (None, bias):
            want = x.float() @ weight.float().T + (0 if b is None else b.float())
            got = linear(x, packed, b)
            assert got.shape == (m, n) and got.dtype == torch.bfloat16
            # one rounding of the float32 sum to bf16 (2^-8 relative), plus float32 summation-order noise
            assert torch.allclose(got.float(), want, rtol=2 ** -8, atol=1e-4 * max(1.0, k ** 0.5)), (m, b is None)


def test_c_gemm_is_batch_invariant_and_takes_strided_rows(rng, gemm_path):
    from llmctl_cpu.ops import linear, pack_linear_weight

    weight = torch.randn(200, 576).bfloat16()
    packed = pack_linear_weight(weight)
    x = torch.randn(531, 576).bfloat16()
    full = linear(x, packed)  # rows split between threads (AMX path)
    for i in (0, 5, 36, 63, 76, 300, 530):
        assert torch.equal(linear(x[i:i + 1], packed), full[i:i + 1])  # a row alone, bit for bit
    for m in (15, 16, 17, 40, 77, 255, 256, 257, 300):  # every row-block arrangement, the overlapping last block
        assert torch.equal(linear(x[:m], packed), full[:m]), m
    wide = torch.randn(37, 1000).bfloat16()
    strided = wide[:, 100:676]  # row stride 1000, unit stride along k
    assert torch.equal(linear(strided, packed), linear(strided.contiguous(), packed))
    assert linear(x.reshape(1, 531, 576), packed).shape == (1, 531, 200)


def test_c_gemm_rejects_mismatched_inputs():
    from llmctl_cpu.ops import linear, pack_linear_weight

    _gemm_lib()
    packed = pack_linear_weight(torch.randn(8, 32).bfloat16())
    with pytest.raises(ValueError, match="33 features, the weight expects 32"):
        linear(torch.randn(2, 33).bfloat16(), packed)
    with pytest.raises(TypeError, match="torch.float32"):
        linear(torch.randn(2, 32), packed)


def _norm_lib():
    from llmctl_cpu import native

    lib = native.kernels()
    if lib is None or not lib.has_norm:
        pytest.skip("the C RMSNorm runs only with the native kernels on AVX-512 or AVX2 + FMA hosts")
    return lib


# -- the C RMSNorm and the fused SwiGLU GEMM ------------------------------------------------------------------------

@pytest.mark.parametrize("width", [1, 17, 64, 576, 1000])
def test_c_rms_norm_within_rounding_of_the_reference(rng, width):
    """Every row count up to the threaded path, residual or not: the residual sum bit for bit, the output within
    two bf16 ulps in rare elements (the sum of squares adds in another order), inputs untouched, row strides
    honoured."""
    from llmctl_cpu.ops import fused_add_rms_norm, rms_norm

    _norm_lib()
    eps = rng.choice([1e-5, 1e-6])
    w = (torch.rand(width) + 0.5).bfloat16()
    for rows in (1, 3, rng.randint(4, 100), 65536 // width + 7):  # the last one splits over threads
        x = (torch.randn(rows, width) * rng.uniform(0.01, 30)).bfloat16()
        res = torch.randn(rows, width).bfloat16()
        x_before, res_before = x.clone(), res.clone()
        _assert_norm_close(rms_norm(x, w, eps), reference.rms_norm(x, w, eps), torch.bfloat16, x, w, eps)
        got, got_res = fused_add_rms_norm(x, res, w, eps)
        want, want_res = reference.fused_add_rms_norm(x, res, w, eps)
        assert torch.equal(got_res, want_res) and got_res.data_ptr() != res.data_ptr()
        _assert_norm_close(got, want, torch.bfloat16, want_res, w, eps)
        assert torch.equal(x, x_before) and torch.equal(res, res_before)
    wide = torch.randn(5, width + 40).bfloat16()
    strided = wide[:, 7:7 + width]
    assert torch.equal(rms_norm(strided, w, 1e-5), rms_norm(strided.contiguous(), w, 1e-5))
    assert rms_norm(torch.randn(2, 3, width).bfloat16(), w, 1e-5).shape == (2, 3, width)  # torch path, same shape


def test_c_rms_norm_is_batch_invariant(rng):
    from llmctl_cpu.ops import fused_add_rms_norm

    _norm_lib()
    x, res, w = torch.randn(300, 576).bfloat16(), torch.randn(300, 576).bfloat16(), torch.randn(576).bfloat16()
    full, full_res = fused_add_rms_norm(x, res, w, 1e-5)
    for i in (0, rng.randint(1, 298), 299):
        one, one_res = fused_add_rms_norm(x[i:i + 1], res[i:i + 1], w, 1e-5)
        assert torch.equal(one, full[i:i + 1]) and torch.equal(one_res, full_res[i:i + 1])


@pytest.mark.parametrize(("d", "k", "bias"), [(16, 1, False), (16, 33, True), (48, 64, False), (768, 576, True),
                                              (32, 96, True)])
def test_fused_swiglu_gemm_equals_the_unfused_ops(rng, gemm_path, d, k, bias):
    """SiLU-and-mul in the GEMM's epilogue rounds where the separate ops do: bit-identical to the C GEMM followed by
    silu_and_mul, for every row remainder, with and without bias, and within bf16 rounding of the reference."""
    from llmctl_cpu.ops import gated_linear, linear, pack_gated_linear_weight, pack_linear_weight
    from llmctl_cpu.ops import silu_and_mul as cpu_silu_and_mul
    from llmctl_cpu.packed_weight import PackedFormat

    weight = (torch.randn(2 * d, k) / k ** 0.5 * 3).bfloat16()
    b = torch.randn(2 * d).bfloat16() if bias else None
    w_before = weight.clone()
    packed, packed_bias = pack_gated_linear_weight(weight, b)
    assert packed.format is PackedFormat.GATED_BF16_PANELS and packed.shape == (2 * d, k)
    assert torch.equal(weight, w_before)
    plain = pack_linear_weight(weight)
    for m in (1, 2, 3, 4, 5, 8, 16, 17, 35, 64, 290, rng.randint(9, 200)):
        x = torch.randn(m, k).bfloat16()
        got = gated_linear(x, packed, packed_bias)
        assert got.shape == (m, d) and got.dtype == torch.bfloat16
        assert torch.equal(got, cpu_silu_and_mul(linear(x, plain, b))), m
        want = reference.gated_linear(x.float(), weight.float(), None if b is None else b.float())
        assert torch.allclose(got.float(), want, rtol=2 ** -6, atol=1e-2 * max(1.0, float(want.abs().max()))), m
    assert gated_linear(torch.randn(2, 3, k).bfloat16(), packed, packed_bias).shape == (2, 3, d)
    with pytest.raises(ValueError, match=f"{k + 1} features, the weight expects {k}"):
        gated_linear(torch.randn(2, k + 1).bfloat16(), packed, packed_bias)
    with pytest.raises(TypeError, match="torch.float32"):
        gated_linear(torch.randn(2, k), packed, packed_bias)


def test_fused_swiglu_gemm_declines_what_it_cannot_take():
    from llmctl_cpu.ops import gated_linear, pack_gated_linear_weight

    _gemm_lib()
    assert pack_gated_linear_weight(torch.randn(2 * 24, 64).bfloat16()) is None  # halves not whole 16-col panels
    assert pack_gated_linear_weight(torch.randn(64, 64)) is None  # float32 stays on linear + silu_and_mul
    assert pack_gated_linear_weight(torch.randn(64, 64).bfloat16(), torch.randn(64)) is None  # float32 bias
    w = torch.randn(48, 40)  # a plain weight, as the contract allows: the unfused ops
    x = torch.randn(3, 40)
    assert torch.allclose(gated_linear(x, w), reference.gated_linear(x, w), atol=1e-5)


@pytest.mark.parametrize("target", ["native", "x86-64-v3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_greedy_sample_is_torch_argmax(rng, dtype, target):
    """Every remainder of the 16-wide (AVX-512) and 8-wide (AVX2 + FMA, x86-64-v3) vector passes, ties (first
    index), NaNs (first NaN), -inf rows, strided rows, and the threaded path, against torch.argmax on the same
    values."""
    if target == "native":
        from llmctl_cpu import native
        from llmctl_cpu.ops import greedy_sample

        lib = native.kernels()
        if lib is None or not lib.has_argmax:
            pytest.skip("the C argmax runs only with the native kernels on AVX-512 or AVX2 + FMA hosts")
    else:
        greedy_sample = native_builds.runnable(target).argmax_rows
    for n in (1, 7, 8, 9, 15, 16, 17, 33, 1000, 49152):
        rows = 70 if n == 49152 else rng.randint(1, 9)  # 70 x 49152 splits over threads
        x = torch.randn(rows, n).to(dtype)
        assert torch.equal(greedy_sample(x), x.float().argmax(dim=-1)), n
        top = x.float().max() + 1
        for r in range(rows):  # plant ties, a NaN or a row of -inf at random places
            kind = rng.choice(["tie", "nan", "two_nans", "neg_inf", "none"])
            a, b = sorted(rng.sample(range(n), 2)) if n > 1 else (0, 0)
            if kind == "tie":
                x[r, a] = x[r, b] = top
            elif kind == "nan":
                x[r, b] = float("nan")
            elif kind == "two_nans":
                x[r, a] = x[r, b] = float("nan")
            elif kind == "neg_inf":
                x[r] = float("-inf")
        got = greedy_sample(x)
        assert got.dtype == torch.int64 and torch.equal(got, x.float().argmax(dim=-1)), n
    wide = torch.randn(4, 300).to(dtype)
    assert torch.equal(greedy_sample(wide[:, 13:213]), wide[:, 13:213].float().argmax(dim=-1))


@pytest.mark.parametrize(("block_size", "group", "head_size"), [(8, 7, 64), (16, 3, 128), (32, 1, 64)])
def test_tiled_bf16_prefill_matches_reference_and_ignores_chunking(manager, rng, block_size, group, head_size, isa):
    """The query-tiled bf16 prefill kernel: against the reference for prompts with and without cached context
    (tiles cut inside blocks when the block size is 8, seven query heads per KV head pad the scoring groups), and
    a row's bits do not depend on where the prompt was cut into chunks."""
    from llmctl_cpu import native

    lib = native.kernels()
    if lib is None or not lib.has_prefill_bf16:
        pytest.skip("no tiled bf16 prefill kernel on this host (needs the native kernels and AVX2 + FMA)")
    backend = manager.registry.attention_backends["cpu-sdpa"].item
    kv_heads = rng.choice([1, 2])
    specs = [(0, rng.randint(3, 70)), (rng.randint(1, 90), rng.randint(2, 40)), (rng.randint(0, 30), 1)]
    query, cache, md = make_batch(rng, specs, block_size, kv_heads, kv_heads * group, head_size, torch.bfloat16)
    scale = head_size ** -0.5
    whole = backend.forward(query, cache, md, scale)
    atol, rtol = TOL[torch.bfloat16]
    torch.testing.assert_close(whole.float(), paged_attention_reference(query, cache, md, scale).float(),
                               atol=atol, rtol=rtol, msg=f"specs={specs}")
    # the first prompt again, cut after `cut` tokens: its later rows (two or more: one would be a decode) as a
    # chunk over cached context
    length = specs[0][1]
    cut = rng.randint(1, length - 2)
    table = md.block_tables[:1]
    chunk_md = AttentionMetadata(
        num_tokens=length - cut, num_seqs=1, query_start_loc=torch.tensor([0, length - cut], dtype=torch.int32),
        seq_lens=torch.tensor([length], dtype=torch.int32), block_tables=table,
        slot_mapping=md.slot_mapping[cut:length], max_query_len=length - cut, max_seq_len=length,
        block_size=block_size, query_lens_cpu=[length - cut], seq_lens_cpu=[length])
    chunk = backend.forward(query[cut:length].contiguous(), cache, chunk_md, scale)
    assert torch.equal(chunk, whole[cut:length]), f"cut={cut} length={length}"


@pytest.mark.parametrize(("block_size", "group", "head_size"), [(16, 4, 64), (32, 3, 128)])
def test_tiled_bf16_prefill_long_prompts(manager, rng, block_size, group, head_size):
    """Prompts past one query tile (16 rows) and past one key block of the P.V pass (128 keys), odd lengths,
    grouped-query heads, a chunk over more cached context than one key block, next to a decode: against the
    reference, and a later chunk's rows equal to the same rows of the whole prompt."""
    from llmctl_cpu import native

    lib = native.kernels()
    if lib is None or not lib.has_prefill_bf16:
        pytest.skip("no tiled bf16 prefill kernel on this host (needs the native kernels and AVX2 + FMA)")
    backend = manager.registry.attention_backends["cpu-sdpa"].item
    length = rng.randint(260, 333) | 1
    specs = [(0, length), (rng.randint(130, 200), rng.randint(17, 40)), (0, 17), (rng.randint(3, 50), 1)]
    query, cache, md = make_batch(rng, specs, block_size, 2, 2 * group, head_size, torch.bfloat16)
    scale = head_size ** -0.5
    whole = backend.forward(query, cache, md, scale)
    atol, rtol = TOL[torch.bfloat16]
    torch.testing.assert_close(whole.float(), paged_attention_reference(query, cache, md, scale).float(),
                               atol=atol, rtol=rtol, msg=f"specs={specs}")
    cut = rng.randint(129, length - 20)
    chunk_md = AttentionMetadata(
        num_tokens=length - cut, num_seqs=1, query_start_loc=torch.tensor([0, length - cut], dtype=torch.int32),
        seq_lens=torch.tensor([length], dtype=torch.int32), block_tables=md.block_tables[:1],
        slot_mapping=md.slot_mapping[cut:length], max_query_len=length - cut, max_seq_len=length,
        block_size=block_size, query_lens_cpu=[length - cut], seq_lens_cpu=[length])
    chunk = backend.forward(query[cut:length].contiguous(), cache, chunk_md, scale)
    assert torch.equal(chunk, whole[cut:length]), f"cut={cut} length={length}"


def test_tiled_bf16_prefill_rejects_block_ids_outside_the_cache(manager, isa):
    from llmctl_cpu import native

    lib = native.kernels()
    if lib is None or not lib.has_prefill_bf16:
        pytest.skip("no tiled bf16 prefill kernel on this host (needs the native kernels and AVX2 + FMA)")
    backend = manager.registry.attention_backends["cpu-sdpa"].item
    query, cache, md = make_batch(random.Random(3), [(0, 20)], 16, 2, 4, 64, torch.bfloat16)
    md.block_tables[0, 1] = cache.shape[1] + 5
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        backend.forward(query, cache, md, 0.125)


def test_amx_and_avx512_gemms_agree(rng):
    """The two paths form the same float32 sums in (possibly) different orders: within a bf16 rounding of each
    other, and switching is safe at any time (the panels are shared)."""
    from llmctl_cpu.ops import linear, pack_linear_weight

    lib = _gemm_lib()
    restore = _set_amx(True)
    try:
        weight = (torch.randn(320, 576) / 24).bfloat16()
        packed = pack_linear_weight(weight)
        x = torch.randn(rng.randint(1, 130), 576).bfloat16()
        amx = linear(x, packed)
        lib.use_amx(False)
        avx = linear(x, packed)
        torch.testing.assert_close(amx.float(), avx.float(), rtol=2 ** -7, atol=1e-3)
    finally:
        restore()


# -- KV cache prefault ------------------------------------------------------------------------------------------------

def test_prefault_zeroes_the_first_blocks_within_the_budget():
    from llmctl_cpu.platform import prefault_kv_cache

    caches = [torch.full((2, 10, 4, 2, 8), float("nan")) for _ in range(3)]
    per_block = 2 * 4 * 2 * 8 * 4  # K and V of one block, float32
    n = prefault_kv_cache(caches, 10, budget_bytes=3 * 4 * per_block)  # four blocks' worth over three layers
    assert n == 4
    for c in caches:
        assert bool((c[:, :4] == 0).all()) and bool(c[:, 4:].isnan().all())
    assert prefault_kv_cache(caches, 10, budget_bytes=0) == 0
    assert prefault_kv_cache(caches, 10, budget_bytes=1 << 40) == 10 and not any(c.isnan().any() for c in caches)
    other = [torch.full((10, 6), float("nan"))]  # not [2, num_blocks, ...]: the same share of its leading bytes
    assert prefault_kv_cache(other, 5, budget_bytes=24 * 4) == 2
    assert bool((other[0][:4] == 0).all()) and bool(other[0][4:].isnan().all())


def test_prefault_budget_comes_from_the_environment(monkeypatch):
    from llmctl_cpu.platform import DEFAULT_KV_PREFAULT_MB, KV_PREFAULT_ENV, kv_prefault_bytes

    monkeypatch.delenv(KV_PREFAULT_ENV, raising=False)
    assert kv_prefault_bytes() == DEFAULT_KV_PREFAULT_MB << 20
    monkeypatch.setenv(KV_PREFAULT_ENV, "0")
    assert kv_prefault_bytes() == 0
    monkeypatch.setenv(KV_PREFAULT_ENV, "lots")
    assert kv_prefault_bytes() == DEFAULT_KV_PREFAULT_MB << 20


def test_engine_hands_the_platform_its_kv_cache_before_any_step(tiny_llama_dir, monkeypatch):
    from llmctl import LLM, SamplingParams
    from llmctl_cpu.platform import CpuPlatform

    seen = []
    real = CpuPlatform.prepare_kv_cache

    def spy(self, kv_caches, num_blocks):
        seen.append((len(kv_caches), num_blocks, [c.data_ptr() for c in kv_caches]))
        real(self, kv_caches, num_blocks)

    monkeypatch.setattr(CpuPlatform, "prepare_kv_cache", spy)
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=1 << 20)
    caches = llm.llm_engine.core.runner.kv_caches
    assert seen == [(len(caches), llm.llm_engine.core.cache_config.num_blocks, [c.data_ptr() for c in caches])]
    out = llm.generate(["hello"], SamplingParams(max_tokens=3, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 3


def _resident_pages(t: torch.Tensor, lo: int, hi: int) -> tuple[int, int]:
    """(resident, total) pages of the byte range [lo, hi) of ``t``'s storage, from mincore."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    page = 4096
    start = (t.data_ptr() + lo) & ~(page - 1)
    end = t.data_ptr() + hi
    n = -(-(end - start) // page)
    vec = (ctypes.c_ubyte * n)()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec), n


def _fresh_cache(num_blocks: int, layers: int = 2) -> list[torch.Tensor]:
    # 64 KiB per block per K/V half, so page rounding at the range edges is negligible; each layer on its own
    # anonymous mapping, untouched until written (the heap could hand back pages an earlier test touched)
    import mmap

    shape = (2, num_blocks, 16, 1024)
    out = []
    for _ in range(layers):
        buf = mmap.mmap(-1, 2 * num_blocks * 16 * 1024 * 4)
        out.append(torch.frombuffer(buf, dtype=torch.float32).view(shape))
    return out


def _resident_blocks(caches: list[torch.Tensor], lo: int, hi: int) -> float:
    per_block = 16 * 1024 * 4
    res = tot = 0
    for c in caches:
        for half in range(2):
            base = half * c.stride(0) * 4
            r, n = _resident_pages(c, base + lo * per_block, base + hi * per_block)
            res, tot = res + r, tot + n
    return res / tot


def test_kv_prefault_follows_the_blocks_reached_and_no_further(monkeypatch):
    from llmctl_cpu.kv_prefault import populate
    from llmctl_cpu.platform import KV_PREFAULT_ENV, CpuPlatform

    if not populate([]):  # pragma: no cover - kernels before 5.14 fall back to zeroing the start-up slab
        pytest.skip("no MADV_POPULATE_WRITE here")
    caches = _fresh_cache(400)
    monkeypatch.setenv(KV_PREFAULT_ENV, "4")  # 4 MiB over 2 layers x 2 halves x 64 KiB: 16 blocks
    pf = CpuPlatform().prepare_kv_cache(caches, 400)
    assert pf is not None and pf.requested == 16 and pf.ahead_blocks == 16
    assert _resident_blocks(caches, 0, 16) == 1.0  # the start-up slab, faulted in now
    assert _resident_blocks(caches, 16, 400) < 0.05  # nothing else
    pf(5)  # the pool reached block 4: over half a slab still ahead, nothing to do
    assert pf.requested == 16
    pf(10)  # under half a slab ahead: up to a slab past the frontier goes to the worker
    assert pf.requested == 26
    pf.wait()
    assert _resident_blocks(caches, 0, 26) == 1.0 and _resident_blocks(caches, 26, 400) < 0.05
    pf(200)  # a jump (a long prompt's blocks): up to a slab past it, still not the whole cache
    pf.wait()
    assert pf.requested == 216
    assert _resident_blocks(caches, 0, 216) == 1.0 and _resident_blocks(caches, 216, 400) < 0.05
    pf(400)
    pf.wait()
    assert pf.requested == 400 and _resident_blocks(caches, 0, 400) == 1.0


def test_kv_prefault_off_leaves_every_page_to_first_touch(monkeypatch):
    from llmctl_cpu.platform import KV_PREFAULT_ENV, CpuPlatform

    caches = _fresh_cache(40)
    monkeypatch.setenv(KV_PREFAULT_ENV, "0")
    assert CpuPlatform().prepare_kv_cache(caches, 40) is None
    assert _resident_blocks(caches, 0, 40) < 0.05


def test_engine_prefault_tracks_the_pool_frontier(tiny_llama_dir, monkeypatch):
    from llmctl import LLM, SamplingParams
    from llmctl_cpu.kv_prefault import KVPrefaulter
    from llmctl_cpu.platform import KV_PREFAULT_ENV

    monkeypatch.setenv(KV_PREFAULT_ENV, "1")
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=64 << 20, block_size=16)
    kv = llm.llm_engine.core.kv
    [pf] = kv.pool.reached_listeners
    assert isinstance(pf, KVPrefaulter) and pf.num_blocks == kv.pool.num_blocks
    assert pf.requested == pf.ahead_blocks < pf.num_blocks // 4  # a small slab, not the cache
    llm.generate([[5 + i] * 100 for i in range(24)], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    pf.wait()
    reached = kv.pool.reached
    assert reached >= 24 * 7  # 24 sequences of 104 tokens held 7 blocks each at once
    assert reached <= pf.requested <= reached + pf.ahead_blocks < pf.num_blocks


# -- float32 linears: MKL's packed GEMM where its self-check passes, else the C GEMM -----------------------------

F32_SHAPES = [(16, 1), (40, 96), (1536, 576), (576, 1536), (33, 17), (1, 64)]


def _check_float32_linear(rng, packed, weight, bias):
    from llmctl_cpu.ops import linear

    n, k = weight.shape
    x = torch.randn(300, k)
    for b in (None, bias):
        full = linear(x, packed, b)
        want = x.double() @ weight.double().T + (0 if b is None else b.double())
        assert full.dtype == torch.float32 and full.shape == (300, n)
        assert torch.allclose(full.double(), want, rtol=1e-5, atol=1e-5 * max(1.0, k ** 0.5))
        for i in (0, rng.randint(1, 298), 299):  # a row alone, and every prefix size checked below, bit for bit
            assert torch.equal(linear(x[i:i + 1], packed, b), full[i:i + 1]), f"row {i} alone"
        for m in (1, 2, 7, 16, 63, 64, 65, 129, rng.randint(1, 299)):
            assert torch.equal(linear(x[:m], packed, b), full[:m]), f"a batch of {m} rows"
    assert linear(torch.randn(2, 3, k), packed).shape == (2, 3, n)
    assert linear(torch.randn(0, k), packed).shape == (0, n)
    strided = torch.randn(5, k + 7)[:, 3:3 + k]
    assert torch.equal(linear(strided, packed), linear(strided.contiguous(), packed))
    with pytest.raises(ValueError, match=f"{k + 1} features, the weight expects {k}"):
        linear(torch.randn(2, k + 1), packed)
    with pytest.raises(TypeError, match="torch.bfloat16"):
        linear(torch.randn(2, k).bfloat16(), packed)


@pytest.mark.parametrize(("n", "k"), F32_SHAPES)
def test_float32_linear_matches_float64_math_and_is_batch_invariant(rng, n, k):
    """Whatever path this host picked for the shape (see llmctl_cpu.f32_linear), rows are the same bits at every
    batch size: this is the guard that fails, naming the host's ISA, when a GEMM breaks the promise somewhere."""
    from llmctl_cpu import f32_linear
    from llmctl_cpu.ops import pack_linear_weight
    from llmctl_cpu.packed_weight import PackedFormat

    weight, bias = torch.randn(n, k), torch.randn(n)
    packed = pack_linear_weight(weight)
    path = f32_linear.path_for(weight)
    fmt = {"mkl": PackedFormat.MKL_F32, "c": PackedFormat.F32_PANELS}.get(path)
    if fmt is None:
        pytest.skip("neither MKL (self-check) nor the float32 C GEMM runs here: oneDNN, not batch-invariant")
    assert packed.format is fmt and packed.shape == (n, k)
    _check_float32_linear(rng, packed, weight, bias)


@pytest.mark.parametrize(("n", "k"), F32_SHAPES)
def test_float32_c_gemm_matches_float64_math_and_is_batch_invariant(rng, monkeypatch, n, k):
    from llmctl_cpu import f32_linear
    from llmctl_cpu.ops import pack_linear_weight
    from llmctl_cpu.packed_weight import PackedFormat

    if not f32_linear.c_gemm_available():
        pytest.skip("the float32 C GEMM needs the C kernels and AVX2 + FMA")
    monkeypatch.setenv(f32_linear.PATH_ENV, "c")
    weight, bias = torch.randn(n, k), torch.randn(n)
    packed = pack_linear_weight(weight)
    assert packed.format is PackedFormat.F32_PANELS and packed.shape == (n, k)
    _check_float32_linear(rng, packed, weight, bias)


def test_mkl_is_taken_only_where_its_self_check_passes(monkeypatch):
    """On hosts where MKL's rows depend on the batch (AMD EPYC) the self-check refuses it; where it passes, the
    full invariance test above runs on MKL. Either way the choice and the check agree, shape by shape."""
    from llmctl_cpu import f32_linear, mkl_sgemm
    from llmctl_cpu.ops import pack_linear_weight
    from llmctl_cpu.packed_weight import PackedFormat

    if not mkl_sgemm.available():
        pytest.skip("this torch build exports no MKL packed sgemm")
    monkeypatch.setenv(f32_linear.PATH_ENV, "mkl")
    for n, k in F32_SHAPES:
        packed = pack_linear_weight(torch.randn(n, k))
        on_mkl = getattr(packed, "format", None) is PackedFormat.MKL_F32
        assert on_mkl == (mkl_sgemm.takes(torch.empty(n, k)) and f32_linear.mkl_is_batch_invariant(n, k)), (n, k)


def test_float32_path_can_be_pinned_and_rejects_unknown_values(monkeypatch):
    from llmctl_cpu import f32_linear

    monkeypatch.setenv(f32_linear.PATH_ENV, "onednn")
    assert f32_linear.path_for(torch.empty(64, 64)) == "onednn"
    assert not f32_linear.report().batch_invariant
    monkeypatch.setenv(f32_linear.PATH_ENV, "blas")
    with pytest.raises(ValueError, match="LLMCTL_CPU_F32_GEMM='blas': must be one of auto, c, mkl, onednn"):
        f32_linear.path_for(torch.empty(64, 64))


def test_mkl_packed_linear_can_be_switched_off(monkeypatch):
    from llmctl_cpu import mkl_sgemm
    from llmctl_cpu.ops import linear, pack_linear_weight
    from llmctl_cpu.packed_weight import PackedFormat

    monkeypatch.setenv(mkl_sgemm.DISABLE_ENV, "0")
    mkl_sgemm._api.cache_clear()
    try:
        assert not mkl_sgemm.available()
        weight = torch.randn(24, 32)
        packed = pack_linear_weight(weight)
        assert getattr(packed, "format", None) is not PackedFormat.MKL_F32  # the C GEMM, oneDNN or plain
        x = torch.randn(3, 32)
        assert torch.allclose(linear(x, packed), x @ weight.T, atol=1e-5)
    finally:
        mkl_sgemm._api.cache_clear()
