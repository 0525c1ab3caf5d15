"""The XPU and TPU plugins on a machine with neither: they load through their entry points, say why they are
unavailable, never raise, and the hardware-independent parts (TPU bucketing and KV layout) are exact."""

from __future__ import annotations

import math
from importlib import metadata

import pytest
import torch
from llmctl.attention import AttentionMetadata
from llmctl.ops.paged_attention import paged_attention_reference, write_kv_reference
from llmctl.plugins import PluginManager, ProbeResult, Support


@pytest.fixture(scope="module")
def manager() -> PluginManager:
    return PluginManager().load()


@pytest.mark.parametrize("ep_name, module", [("xpu", "llmctl_xpu"), ("tpu", "llmctl_tpu")])
def test_plugins_load_through_entry_points(manager, ep_name: str, module: str) -> None:
    eps = {ep.name: ep for ep in metadata.entry_points(group="llmctl.plugins")}
    assert eps[ep_name].value == module
    info = manager.plugins[ep_name]
    assert not info.broken and not info.disabled, info.error
    assert info.api_version == "2.5"
    assert info.distribution == f"llmctl-{ep_name}"


def test_xpu_registration(manager) -> None:
    platform = manager.registry.platforms["xpu"].item
    assert (platform.name, platform.device_type, platform.priority) == ("xpu", "xpu", 90)
    expected_backend = "xccl" if "xccl" in torch.distributed.Backend.backend_list else "ccl"
    from llmctl_xpu.platform import xpu_dist_backend

    assert xpu_dist_backend() == expected_backend
    assert [b.name for b in manager.registry.backends_for("xpu")] == ["xpu-ipex-paged", "torch-reference"]
    assert manager.registry.communicator_for("xpu").name == "xpu-ccl"
    assert manager.registry.attention_backends["xpu-ipex-paged"].plugin == "xpu"


def test_tpu_registration(manager) -> None:
    platform = manager.registry.platforms["tpu"].item
    assert (platform.name, platform.device_type, platform.priority) == ("tpu", "xla", 90)
    assert [b.name for b in manager.registry.backends_for("tpu")] == ["tpu-ragged-paged", "torch-reference"]
    assert manager.registry.communicator_for("tpu").name == "xla-collectives"


@pytest.mark.skipif(torch.xpu.is_available(), reason="an XPU is present")
def test_xpu_not_available_with_reason(manager) -> None:
    probe = manager.registry.platforms["xpu"].item.probe()
    assert isinstance(probe, ProbeResult) and not probe.available
    assert "torch.xpu is not available" in probe.reason
    with pytest.raises(ValueError, match="platform 'xpu' is not available: torch.xpu is not available"):
        manager.select_platform("xpu")


def test_tpu_not_available_with_reason(manager) -> None:
    import importlib.util

    if importlib.util.find_spec("torch_xla") is not None:
        pytest.skip("torch_xla is installed here")
    probe = manager.registry.platforms["tpu"].item.probe()
    assert not probe.available and probe.reason.startswith("torch_xla is not installed")
    with pytest.raises(ValueError, match="torch_xla is not installed"):
        manager.select_platform("tpu")


def test_auto_selection_skips_unavailable_accelerators(manager) -> None:
    chosen = manager.select_platform("auto")
    assert chosen.name not in ("xpu", "tpu")
    assert manager.probe(chosen.name).available


def test_attention_backends_say_why_not(manager) -> None:
    ipex = manager.registry.attention_backends["xpu-ipex-paged"].item.supports(torch.float16, 128, 16, frozenset())
    assert isinstance(ipex, Support) and not ipex and "intel_extension_for_pytorch" in ipex.reason
    xla = manager.registry.attention_backends["tpu-ragged-paged"].item.supports(torch.bfloat16, 128, 16, frozenset())
    assert isinstance(xla, Support) and not xla and "torch_xla" in xla.reason


def test_doctor_checks_report_without_raising(manager) -> None:
    results = {e.plugin: e.item.run() for e in manager.registry.doctor_checks if e.plugin in ("xpu", "tpu")}
    assert set(results) == {"xpu", "tpu"}
    assert not results["xpu"].ok and "torch.xpu" in results["xpu"].message
    assert not results["tpu"].ok and "torch_xla" in results["tpu"].message


# -- TPU bucketing ---------------------------------------------------------------------------------------------
def test_power_of_two_buckets() -> None:
    from llmctl_tpu.bucketing import bucket_for, power_of_two_buckets

    assert power_of_two_buckets(16, 128) == [16, 32, 64, 128]
    assert power_of_two_buckets(16, 100) == [16, 32, 64, 100]
    assert power_of_two_buckets(8, 8) == [8]
    with pytest.raises(ValueError):
        power_of_two_buckets(12, 64)
    buckets = power_of_two_buckets(16, 100)
    for n in range(1, 101):
        b = bucket_for(n, buckets)
        assert b >= n and all(x < n for x in buckets if x < b)
    with pytest.raises(ValueError):
        bucket_for(101, buckets)


@pytest.mark.parametrize("max_tokens, max_seqs", [(512, 64), (100, 100), (256, 3), (16, 16)])
def test_warmup_plan_covers_every_reachable_shape(max_tokens: int, max_seqs: int) -> None:
    """Brute force: every (tokens, seqs) a scheduler can produce maps into the plan, and every planned shape
    is hit by some batch (nothing compiled in vain)."""
    from llmctl_tpu.bucketing import BucketConfig, warmup_plan

    cfg = BucketConfig(max_tokens, max_seqs)
    plan = warmup_plan(max_tokens, max_seqs)
    assert len(plan) == len(set(plan)) and plan == sorted(plan)
    assert len(plan) <= len(cfg.token_buckets) * len(cfg.seq_buckets)
    hit = set()
    for tokens in range(1, max_tokens + 1):
        for seqs in range(1, min(tokens, max_seqs) + 1):
            shape = cfg.shape_for(tokens, seqs)
            assert shape in plan, (tokens, seqs, shape)
            hit.add(shape)
    assert hit == set(plan)


def _metadata(seqs: list[tuple[int, int]], block_size: int, gen: torch.Generator) -> AttentionMetadata:
    n_blocks = [math.ceil((c + q) / block_size) for c, q in seqs]
    perm = torch.randperm(sum(n_blocks), generator=gen).tolist()
    tables = torch.zeros(len(seqs), max(n_blocks), dtype=torch.int32)
    slots, qsl, cur = [], [0], 0
    for i, ((c, q), n) in enumerate(zip(seqs, n_blocks, strict=True)):
        tables[i, :n] = torch.tensor(perm[cur:cur + n], dtype=torch.int32)
        cur += n
        slots += [int(tables[i, p // block_size]) * block_size + p % block_size for p in range(c + q)]
        qsl.append(qsl[-1] + q)
    seq_lens = [c + q for c, q in seqs]
    return AttentionMetadata(
        num_tokens=qsl[-1], num_seqs=len(seqs), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),  # all context slots; the test slices the new ones
        max_query_len=max(q for _, q in seqs), max_seq_len=max(seq_lens), block_size=block_size,
        query_lens_cpu=[q for _, q in seqs], seq_lens_cpu=seq_lens)


def test_padding_does_not_change_attention() -> None:
    """Core's reference attention on the bucket-padded batch gives, on the real rows, exactly what it gives on
    the unpadded batch; padded slots (-1) write nothing; padded rows cannot leak in (they hold NaN)."""
    from llmctl_tpu.bucketing import BucketConfig, pad_batch

    gen = torch.Generator().manual_seed(0)
    bs, heads, kv_heads, d = 16, 8, 2, 64
    seqs = [(0, 13), (20, 6), (40, 1), (3, 1), (0, 2)]
    full = _metadata(seqs, bs, gen)
    # Split each sequence's slots into cached context and this step's new tokens.
    ctx_slots, new_slots, off = [], [], 0
    for c, q in seqs:
        ctx_slots += full.slot_mapping[off:off + c].tolist()
        new_slots += full.slot_mapping[off + c:off + c + q].tolist()
        off += c + q
    md = AttentionMetadata(**{**full.__dict__, "slot_mapping": torch.tensor(new_slots, dtype=torch.int64)})
    num_blocks = int(full.block_tables.max()) + 1
    cache = torch.zeros(2, num_blocks, bs, kv_heads, d)
    ctx = torch.tensor(ctx_slots, dtype=torch.int64)
    write_kv_reference(torch.randn(len(ctx), kv_heads, d, generator=gen),
                       torch.randn(len(ctx), kv_heads, d, generator=gen), cache, ctx)
    q = torch.randn(md.num_tokens, heads, d, generator=gen)
    k = torch.randn(md.num_tokens, kv_heads, d, generator=gen)
    v = torch.randn(md.num_tokens, kv_heads, d, generator=gen)

    cfg = BucketConfig(max_num_batched_tokens=64, max_num_seqs=16, min_tokens=16, min_seqs=8)
    padded = pad_batch(cfg, md, torch.arange(md.num_tokens), torch.arange(md.num_tokens), max_blocks_per_seq=8)
    pmd = padded.metadata
    assert (pmd.slot_mapping.shape[0], pmd.num_seqs) == cfg.shape_for(md.num_tokens, md.num_seqs) == (32, 8)
    assert pmd.block_tables.shape == (8, 8) and pmd.num_tokens == md.num_tokens
    assert (padded.real_num_tokens, padded.real_num_seqs) == (md.num_tokens, md.num_seqs)
    assert padded.input_ids.shape == (32,) and bool((pmd.slot_mapping[md.num_tokens:] == -1).all())

    def nan_rows(t: torch.Tensor) -> torch.Tensor:
        return torch.cat((t, torch.full((32 - t.shape[0], *t.shape[1:]), float("nan"))))

    plain_cache, padded_cache = cache.clone(), cache.clone()
    write_kv_reference(k, v, plain_cache, md.slot_mapping)
    write_kv_reference(nan_rows(k), nan_rows(v), padded_cache, pmd.slot_mapping)
    assert torch.equal(plain_cache, padded_cache)
    scale = d ** -0.5
    expected = paged_attention_reference(q, plain_cache, md, scale)
    got = paged_attention_reference(nan_rows(q), padded_cache, pmd, scale)
    torch.testing.assert_close(got[:md.num_tokens], expected, rtol=0, atol=0)


def test_pad_metadata_rejects_shrinking() -> None:
    from llmctl_tpu.bucketing import pad_metadata

    md = _metadata([(0, 5), (3, 1)], 16, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError):
        pad_metadata(md, 4, 2)
    with pytest.raises(ValueError):
        pad_metadata(md, 16, 1)


@pytest.mark.parametrize("block_size", [16, 32])
def test_tpu_combined_kv_layout_round_trips_through_reference_attention(block_size: int) -> None:
    """The TPU write path (combined K/V heads, scratch page for slot -1) stores exactly what the reference
    layout would, so the kernel reads the right K/V; checked on the CPU since the write is pure torch."""
    from llmctl_tpu.attention import RaggedPagedAttention, to_reference_layout

    backend = RaggedPagedAttention()
    gen = torch.Generator().manual_seed(block_size)
    num_blocks, kv_heads, d, n = 6, 2, 64, 40
    shape = backend.kv_cache_shape(num_blocks, block_size, kv_heads, d)
    assert shape == (num_blocks + 1, block_size, 2 * kv_heads, d)
    cache = torch.zeros(shape)
    ref = torch.zeros(2, num_blocks, block_size, kv_heads, d)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[::7] = -1
    k, v = torch.randn(n, kv_heads, d, generator=gen), torch.randn(n, kv_heads, d, generator=gen)
    backend.write_kv(k, v, cache, slots)
    write_kv_reference(k, v, ref, slots)
    assert torch.equal(to_reference_layout(cache), ref)
    assert torch.equal(cache[:, :, 0::2][:-1], ref[0]) and torch.equal(cache[:, :, 1::2][:-1], ref[1])
