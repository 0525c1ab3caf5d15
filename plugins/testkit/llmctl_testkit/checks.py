"""The contract checks: each compares one piece of a backend with core's torch reference and raises
:class:`~llmctl_testkit.harness.ContractViolation` naming the clause it broke.

Inputs are random but seeded, built on the CPU in float32, cast once to the dtype under test, and the very same
rounded values are given to the reference (in float32), so the only differences measured are the kernel's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from llmctl.attention import AttentionMetadata
from llmctl.ops import Ops, reference
from llmctl.ops.paged_attention import paged_attention_reference, write_kv_reference
from llmctl.plugins import AttentionBackend, Platform, ProbeResult, Support

from llmctl_testkit.harness import ContractViolation, assert_close, require

# (context already cached before this step, new query tokens) per sequence. Together they cover fresh
# prefills, chunked prefill on top of a prefix-cache hit, decodes at and around block boundaries, and a
# sequence whose whole context is its single new token.
SCENARIOS: dict[str, list[tuple[int, int]]] = {
    "mixed": [(0, 37), (35, 11), (49, 1), (0, 5), (15, 1), (64, 1), (16, 16)],
    "decode": [(0, 1), (1, 1), (15, 1), (16, 1), (31, 1), (70, 1)],
    "prefill": [(0, 1), (0, 17), (0, 48), (0, 3)],
    # the mixed batch plus rows after the last sequence (as a bucketing runner pads them), whose slots are -1
    "padded": [(0, 37), (35, 11), (49, 1), (0, 5)],
    "sliding_window": [(0, 40), (30, 9), (60, 1), (5, 1)],
    # encoders (the "bidirectional" feature): whole sequences from no cached context, every key seen by every query
    "bidirectional": [(0, 37), (0, 5), (0, 1), (0, 16)],
    # Gemma 2's "logits_soft_cap": scores squashed as cap * tanh(s / cap) before the softmax, prefills and decodes
    "soft_cap": [(0, 30), (20, 9), (40, 1), (7, 1)],
}
PAD_ROWS = 5
SLIDING_WINDOW = 13
SOFT_CAP = 1.0  # below most of the case's scores, so a kernel that ignores the cap fails


@dataclass
class AttentionCase:
    dtype: torch.dtype
    head_size: int
    block_size: int
    num_heads: int
    num_kv_heads: int
    scenario: str
    seed: int = 0

    def describe(self) -> str:
        return (f"{self.scenario} batch, dtype={self.dtype}, head_size={self.head_size}, "
                f"block_size={self.block_size}, heads={self.num_heads}/{self.num_kv_heads} (q/kv)")


@dataclass
class Batch:
    metadata: AttentionMetadata
    query: torch.Tensor  # [rows, H, D] in the dtype under test (rows >= metadata.num_tokens when padded)
    new_key: torch.Tensor  # [rows, Hkv, D]
    new_value: torch.Tensor
    past_key: torch.Tensor  # [past tokens, Hkv, D], already cached before this step
    past_value: torch.Tensor
    past_slots: torch.Tensor  # [past tokens] int64
    num_blocks: int


def build_batch(case: AttentionCase) -> Batch:
    """A flattened batch plus the K/V of earlier steps, as core's runner would present it."""
    gen = torch.Generator().manual_seed(1000 + case.seed)
    seqs = SCENARIOS[case.scenario]
    bs = case.block_size
    blocks_per_seq = [math.ceil((c + q) / bs) for c, q in seqs]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks nobody owns: a kernel must never read them
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    # The last block id becomes the first block of a sequence whose first block is context cached before this
    # step: a write_kv that treats slot -1 as a Python index lands there and corrupts it, every time. (Were it
    # a block written in this same step, which write wins among duplicate indices would be up to chance.)
    last = num_blocks - 1
    perm.remove(last)
    owner = next((i for i, (ctx, _) in enumerate(seqs) if ctx >= bs), 0)
    perm.insert(sum(blocks_per_seq[:owner]), last)
    width = max(blocks_per_seq) + 1
    block_tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    cursor = 0
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = torch.tensor(perm[cursor:cursor + n], dtype=torch.int32)
        cursor += n

    def slot(seq: int, pos: int) -> int:
        return int(block_tables[seq, pos // bs]) * bs + pos % bs

    past_slots, new_slots, qsl = [], [], [0]
    for i, (ctx, q) in enumerate(seqs):
        past_slots += [slot(i, p) for p in range(ctx)]
        new_slots += [slot(i, p) for p in range(ctx, ctx + q)]
        qsl.append(qsl[-1] + q)
    num_tokens = qsl[-1]
    rows = num_tokens + (PAD_ROWS if case.scenario == "padded" else 0)
    slots = new_slots + [-1] * (rows - num_tokens)

    def rand(n: int, heads: int) -> torch.Tensor:
        return torch.randn(n, heads, case.head_size, generator=gen).to(case.dtype)

    query = rand(rows, case.num_heads)
    new_key, new_value = rand(rows, case.num_kv_heads), rand(rows, case.num_kv_heads)
    if rows > num_tokens:  # padded rows carry NaN: if they are attended to or written anywhere, it shows
        for t in (query, new_key, new_value):
            t[num_tokens:] = float("nan")
    past_key, past_value = rand(len(past_slots), case.num_kv_heads), rand(len(past_slots), case.num_kv_heads)
    seq_lens = [c + q for c, q in seqs]
    metadata = AttentionMetadata(
        num_tokens=num_tokens,
        num_seqs=len(seqs),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(q for _, q in seqs),
        max_seq_len=max(seq_lens),
        block_size=bs,
        query_lens_cpu=[q for _, q in seqs],
        seq_lens_cpu=seq_lens,
    )
    return Batch(metadata, query, new_key, new_value, past_key, past_value,
                 torch.tensor(past_slots, dtype=torch.int64), num_blocks)


def metadata_to(md: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    return AttentionMetadata(
        num_tokens=md.num_tokens, num_seqs=md.num_seqs, query_start_loc=md.query_start_loc.to(device),
        seq_lens=md.seq_lens.to(device), block_tables=md.block_tables.to(device),
        slot_mapping=md.slot_mapping.to(device), max_query_len=md.max_query_len, max_seq_len=md.max_seq_len,
        block_size=md.block_size, query_lens_cpu=md.query_lens_cpu, seq_lens_cpu=md.seq_lens_cpu)


def case_features(case: AttentionCase) -> frozenset[str]:
    if case.scenario == "bidirectional":
        return frozenset({"bidirectional"})
    feats = {"prefix_caching", "chunked_prefill"}
    if case.scenario == "sliding_window":
        feats.add("sliding_window")
    if case.scenario == "soft_cap":
        feats.add("logits_soft_cap")
    return frozenset(feats)


def check_supports(backend: AttentionBackend, case: AttentionCase) -> Support:
    try:
        support = backend.supports(case.dtype, case.head_size, case.block_size, case_features(case))
    except Exception as exc:
        raise ContractViolation("attention.supports", f"{backend.name}.supports() raised "
                                                      f"{type(exc).__name__}: {exc}") from exc
    require(isinstance(support, Support), "attention.supports",
            f"{backend.name}.supports() returned {type(support).__name__}, not llmctl.plugins.Support")
    require(bool(support) or bool(support.reason), "attention.supports",
            f"{backend.name}.supports() said no without a reason")
    return support



def _write_past_and_new(backend: AttentionBackend, batch: Batch, kv_cache: torch.Tensor, dmd: AttentionMetadata,
                        device: torch.device | str, clause: str, what: str) -> None:
    """The case's earlier tokens, then this step's, through the backend's own write_kv; a raise names ``clause``."""
    try:
        backend.write_kv(batch.past_key.to(device), batch.past_value.to(device), kv_cache,
                         batch.past_slots.to(device))
        backend.write_kv(batch.new_key.to(device), batch.new_value.to(device), kv_cache, dmd.slot_mapping)
    except Exception as exc:
        raise ContractViolation(clause, f"{backend.name}.write_kv raised {type(exc).__name__}: {exc} ({what})") \
            from exc


def _owned_slots(batch: Batch, md: AttentionMetadata, block_size: int) -> torch.Tensor:
    """[num_blocks, block_size] bool: the slots the case wrote (the others hold poison and are not compared)."""
    flat = torch.zeros(batch.num_blocks * block_size, dtype=torch.bool)
    flat[batch.past_slots] = True
    flat[md.slot_mapping[md.slot_mapping >= 0]] = True
    return flat.view(batch.num_blocks, block_size)

def check_attention(backend: AttentionBackend, device: torch.device, case: AttentionCase) -> None:
    """write_kv + forward of ``backend`` against the reference on one batch.

    Contract clauses exercised:
    - ``attention.kv_cache_shape``: a tuple of ints we can allocate.
    - ``attention.write_kv``: stores K/V so that forward finds them; slot -1 is skipped (checked through the
      padded scenario, whose skipped rows hold NaN). With the default layout the cache is compared directly.
    - ``attention.forward``: matches the reference on every real row, even though every KV slot the batch does
      not own is poisoned with NaN (core allocates the cache with ``torch.empty``: unowned slots hold garbage).
    - ``attention.forward.out``: with ``out=`` given (poisoned with NaN), the result lands in ``out``.
    - ``attention.forward.new_kv``: with this step's ``key``/``value`` passed as core passes them (every row,
      padding included), the result is the same.
    """
    batch = build_batch(case)
    md = batch.metadata
    scale = 0.9 / math.sqrt(case.head_size)  # not the default 1/sqrt(d): a kernel ignoring `scale` fails
    window = SLIDING_WINDOW if case.scenario == "sliding_window" else None
    causal = case.scenario != "bidirectional"
    cap = {"logits_soft_cap": SOFT_CAP} if case.scenario == "soft_cap" else {}

    # Reference: float32 on the CPU, fed the same dtype-rounded inputs.
    ref_cache = torch.zeros(2, batch.num_blocks, case.block_size, case.num_kv_heads, case.head_size)
    write_kv_reference(batch.past_key.float(), batch.past_value.float(), ref_cache, batch.past_slots)
    write_kv_reference(batch.new_key.float(), batch.new_value.float(), ref_cache, md.slot_mapping)
    expected = paged_attention_reference(batch.query.float(), ref_cache, md, scale, window,
                                         causal=causal, **cap)[:md.num_tokens]

    try:
        shape = backend.kv_cache_shape(batch.num_blocks, case.block_size, case.num_kv_heads, case.head_size)
    except Exception as exc:
        raise ContractViolation("attention.kv_cache_shape", f"raised {type(exc).__name__}: {exc}") from exc
    require(isinstance(shape, tuple) and all(isinstance(x, int) and x > 0 for x in shape),
            "attention.kv_cache_shape", f"{backend.name}: expected a tuple of positive ints, got {shape!r}")
    kv_cache = torch.empty(shape, dtype=case.dtype, device=device)
    kv_cache.fill_(float("nan"))

    dmd = metadata_to(md, device)
    _write_past_and_new(backend, batch, kv_cache, dmd, device, "attention.write_kv", case.describe())
    if shape == ref_cache.shape:
        # Default layout: every owned slot must equal the reference's (NaN-poisoned unowned slots are skipped).
        owned = _owned_slots(batch, md, case.block_size).view(1, batch.num_blocks, case.block_size, 1, 1)
        owned = owned.expand(ref_cache.shape)
        assert_close("attention.write_kv", kv_cache.float().cpu()[owned], ref_cache[owned], case.dtype,
                     f"{backend.name}: KV cache contents after write_kv ({case.describe()})")

    query = batch.query.to(device)
    extra: dict = dict(cap)  # the capped scenario passes logits_soft_cap as core's layers do
    if not causal:  # as core's encoder attention calls it (with this step's keys/values)
        extra.update(causal=False, key=batch.new_key.to(device), value=batch.new_value.to(device))
    try:
        result = backend.forward(query, kv_cache, dmd, scale, window, **extra)
    except Exception as exc:
        raise ContractViolation("attention.forward", f"{backend.name}.forward raised {type(exc).__name__}: "
                                                     f"{exc} ({case.describe()})") from exc
    require(isinstance(result, torch.Tensor) and tuple(result.shape) == tuple(query.shape), "attention.forward",
            f"{backend.name}: forward must return [num_tokens, num_heads, head_size] = {tuple(query.shape)}, got "
            f"{getattr(result, 'shape', type(result).__name__)}")
    require(result.dtype == query.dtype, "attention.forward",
            f"{backend.name}: output dtype {result.dtype} != query dtype {query.dtype}")
    assert_close("attention.forward", result[:md.num_tokens], expected, case.dtype,
                 f"{backend.name} vs torch reference ({case.describe()})")

    out = torch.full_like(query, float("nan"))
    try:
        backend.forward(query, kv_cache, dmd, scale, window, out=out, **extra)
    except Exception as exc:
        raise ContractViolation("attention.forward.out", f"{backend.name}.forward(out=...) raised "
                                                         f"{type(exc).__name__}: {exc}") from exc
    assert_close("attention.forward.out", out[:md.num_tokens], expected, case.dtype,
                 f"{backend.name}: rows of `out` after forward(out=out) ({case.describe()})")

    try:
        given = backend.forward(query, kv_cache, dmd, scale, window, **{
            **extra, "key": batch.new_key.to(device), "value": batch.new_value.to(device)})
    except Exception as exc:
        raise ContractViolation("attention.forward.new_kv", f"{backend.name}.forward(key=..., value=...) raised "
                                                            f"{type(exc).__name__}: {exc}") from exc
    assert_close("attention.forward.new_kv", given[:md.num_tokens], expected, case.dtype,
                 f"{backend.name}: forward with this step's key/value ({case.describe()})")


def check_attention_kv8(backend: AttentionBackend, device: torch.device, case: AttentionCase,
                        kv_dtype: torch.dtype) -> None:
    """write_kv + forward over an 8-bit KV cache (``llmctl.kv.cache_dtype``), for a backend whose ``supports``
    accepted the dtype's ``kv_cache_*`` feature.

    Contract clauses exercised:
    - ``attention.kv8.write_kv``: with the default layout, every owned row holds the reference's bytes (the
      codes and the float32 scale of ``quantize_rows``); unowned slots hold poison bytes (NaN codes, huge scales).
    - ``attention.kv8.forward``: matches the reference's attention over the same 8-bit cache.
    """
    from llmctl.kv.cache_dtype import kv_row_width

    batch = build_batch(case)
    md = batch.metadata
    scale = 0.9 / math.sqrt(case.head_size)
    window = SLIDING_WINDOW if case.scenario == "sliding_window" else None
    row = kv_row_width(case.head_size, kv_dtype)
    ref_cache = torch.zeros(2, batch.num_blocks, case.block_size, case.num_kv_heads, row, dtype=kv_dtype)
    write_kv_reference(batch.past_key, batch.past_value, ref_cache, batch.past_slots)
    write_kv_reference(batch.new_key, batch.new_value, ref_cache, md.slot_mapping)
    expected = paged_attention_reference(batch.query, ref_cache, md, scale, window)[:md.num_tokens]

    shape = backend.kv_cache_shape(batch.num_blocks, case.block_size, case.num_kv_heads, row)
    kv_cache = torch.empty(shape, dtype=kv_dtype, device=device)
    kv_cache.view(torch.uint8).fill_(0x7F)
    dmd = metadata_to(md, device)
    _write_past_and_new(backend, batch, kv_cache, dmd, device, "attention.kv8.write_kv",
                        f"{case.describe()}, {kv_dtype}")
    if shape == ref_cache.shape:
        owned = _owned_slots(batch, md, case.block_size)
        got, want = kv_cache.cpu().view(torch.uint8)[:, owned], ref_cache.view(torch.uint8)[:, owned]
        differ = int((got != want).sum())
        require(differ == 0, "attention.kv8.write_kv",
                f"{backend.name}: {differ} bytes of the owned rows differ from the reference's quantization "
                f"({case.describe()}, {kv_dtype})")
    try:
        result = backend.forward(batch.query.to(device), kv_cache, dmd, scale, window)
    except Exception as exc:
        raise ContractViolation("attention.kv8.forward", f"{backend.name}.forward raised {type(exc).__name__}: "
                                                         f"{exc} ({case.describe()}, {kv_dtype})") from exc
    assert_close("attention.kv8.forward", result[:md.num_tokens], expected, case.dtype,
                 f"{backend.name} vs torch reference over a {kv_dtype} cache ({case.describe()})")


# -- registration ----------------------------------------------------------------------------------------------
def check_platform_metadata(platform: Platform, probe: ProbeResult) -> None:
    clause = "registration.platform"
    require(isinstance(platform.name, str) and platform.name.strip() == platform.name and bool(platform.name),
            clause, f"platform name must be a non-empty string without surrounding spaces, got {platform.name!r}")
    require(isinstance(platform.device_type, str) and bool(platform.device_type), clause,
            f"{platform.name}: device_type must name a torch device type, got {platform.device_type!r}")
    require(isinstance(platform.priority, int), clause,
            f"{platform.name}: priority must be an int, got {type(platform.priority).__name__}")
    require(isinstance(platform.options, Mapping) and all(
        isinstance(k, str) and k.isidentifier() and isinstance(v, str) and v for k, v in platform.options.items()),
        "platform.options", f"{platform.name}: options must map option names to descriptions, "
                            f"got {platform.options!r}")
    require(isinstance(probe, ProbeResult), "platform.probe",
            f"{platform.name}: probe() returned {type(probe).__name__}, not ProbeResult")
    require(probe.available or bool(probe.reason.strip()), "platform.probe",
            f"{platform.name}: probe() says unavailable without a reason the user can act on")
    try:
        dtypes = platform.supported_dtypes()
    except Exception as exc:
        raise ContractViolation("platform.supported_dtypes", f"raised {type(exc).__name__}: {exc}") from exc
    require(isinstance(dtypes, list) and len(dtypes) > 0 and all(isinstance(d, torch.dtype) for d in dtypes),
            "platform.supported_dtypes", f"{platform.name}: expected a non-empty list of torch dtypes, got {dtypes!r}")
    try:
        emulated = platform.emulated_dtypes()
    except Exception as exc:
        raise ContractViolation("platform.emulated_dtypes", f"raised {type(exc).__name__}: {exc}") from exc
    require(isinstance(emulated, list) and all(isinstance(d, torch.dtype) for d in emulated)
            and not set(emulated) & set(dtypes), "platform.emulated_dtypes",
            f"{platform.name}: expected a list of torch dtypes outside supported_dtypes() {dtypes!r}, "
            f"got {emulated!r}")
    try:
        device = platform.torch_device(0)
    except Exception as exc:
        raise ContractViolation("platform.torch_device", f"raised {type(exc).__name__}: {exc}") from exc
    require(isinstance(device, torch.device) and device.type == platform.device_type, "platform.torch_device",
            f"{platform.name}: torch_device(0) = {device!r} does not have device_type {platform.device_type!r}")


def check_memory_info(platform: Platform) -> None:
    try:
        free, total = platform.memory_info(0)
    except Exception as exc:
        raise ContractViolation("platform.memory_info",
                                f"{platform.name}: memory_info(0) raised {type(exc).__name__}: {exc}; core sizes "
                                f"the KV cache from it on an available platform") from exc
    require(isinstance(free, int) and isinstance(total, int) and 0 <= free <= total and total > 0,
            "platform.memory_info", f"{platform.name}: expected ints 0 <= free <= total, got ({free!r}, {total!r})")


def check_configure(platform: Platform) -> None:
    """``configure`` returns engine-argument changes by field name and leaves the arguments alone; the platform's
    process-wide settings (threads) are restored afterwards."""
    from dataclasses import asdict, fields

    from llmctl.config import EngineArgs

    clause = "platform.configure"
    args = EngineArgs(model="testkit-model")
    before = asdict(args)
    threads = torch.get_num_threads()
    try:
        changes = platform.configure(args)
    except Exception as exc:
        raise ContractViolation(clause, f"{platform.name}: configure() raised {type(exc).__name__}: {exc}") from exc
    finally:
        torch.set_num_threads(threads)
    require(isinstance(changes, dict), clause, f"{platform.name}: configure() returned {type(changes).__name__}, "
                                               f"not a dict of engine-argument changes")
    known = {f.name for f in fields(EngineArgs)}
    unknown = sorted(set(changes) - known)
    require(not unknown, clause, f"{platform.name}: configure() names no engine argument: {unknown}")
    require(asdict(args) == before, clause, f"{platform.name}: configure() changed the arguments itself; return "
                                            f"the changes instead, core applies them")


def check_kv_cache_hooks(platform: Platform, backend: AttentionBackend, device: torch.device) -> None:
    """``profile_kv_cache_bytes`` answers ``None`` or a byte count; ``prepare_kv_cache`` keeps the cache's shape,
    dtype and storage."""
    ran: list[bool] = []
    try:
        kv_bytes = platform.profile_kv_cache_bytes(lambda: ran.append(True), gpu_memory_utilization=None,
                                                   bytes_per_block=1 << 16, block_size=16, max_model_len=128)
    except Exception as exc:
        raise ContractViolation("platform.profile_kv_cache_bytes",
                                f"{platform.name}: raised {type(exc).__name__}: {exc}") from exc
    require(kv_bytes is None or (isinstance(kv_bytes, int) and not isinstance(kv_bytes, bool) and kv_bytes >= 0),
            "platform.profile_kv_cache_bytes", f"{platform.name}: expected None or bytes >= 0, got {kv_bytes!r}")
    num_blocks = 8
    shape = backend.kv_cache_shape(num_blocks, 16, 2, 64)
    caches = [torch.empty(shape, dtype=torch.float32, device=device) for _ in range(2)]
    ptrs = [t.data_ptr() for t in caches]
    try:
        platform.prepare_kv_cache(caches, num_blocks)
    except Exception as exc:
        raise ContractViolation("platform.prepare_kv_cache",
                                f"{platform.name}: raised {type(exc).__name__}: {exc}") from exc
    require(len(caches) == 2 and all(tuple(t.shape) == tuple(shape) and t.dtype == torch.float32 for t in caches)
            and [t.data_ptr() for t in caches] == ptrs, "platform.prepare_kv_cache",
            f"{platform.name}: prepare_kv_cache changed the caches' number, shape, dtype or storage")


# -- op overrides ----------------------------------------------------------------------------------------------
def overridden_ops(ops: Ops) -> list[str]:
    ref = Ops.reference()
    return [name for name in reference.OP_NAMES if getattr(ops, name) is not getattr(ref, name)]


def _op_inputs(name: str, dtype: torch.dtype, gen: torch.Generator) -> list[tuple[tuple, dict]]:
    """Argument sets for one op, in the dtype under test, on the CPU (the caller moves them)."""

    def r(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dt)

    if name == "rms_norm":
        return [((r(7, 64), r(64), 1e-5), {}), ((r(3, 5, 128), r(128) + 1, 1e-6), {})]
    if name == "fused_add_rms_norm":
        return [((r(7, 64), r(7, 64), r(64), 1e-5), {}), ((r(2, 3, 128), r(2, 3, 128), r(128), 1e-6), {})]
    if name == "rotary_embedding":
        cases = []
        for head, rot, neox in ((64, 64, True), (64, 64, False), (128, 64, True)):
            inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
            freqs = torch.outer(torch.arange(256).float(), inv)
            cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)
            positions = torch.randint(0, 256, (9,), generator=gen)
            cases.append(((positions, r(9, 4, head), r(9, 2, head), cache, neox), {}))
        return cases
    if name == "silu_and_mul":
        return [((r(7, 128),), {}), ((r(2, 3, 256),), {})]
    if name == "apply_top_k_top_p":
        logits = torch.randn(6, 50, generator=gen)
        top_k = torch.tensor([0, 1, 5, 50, 10, 3])
        top_p = torch.tensor([1.0, 0.9, 0.5, 0.3, 1.0, 0.8])
        return [((logits.clone(), top_k, top_p), {}), ((logits.clone(), top_k, None), {}),
                ((logits.clone(), None, top_p), {}), ((logits.clone(), None, None), {})]
    if name == "apply_min_p":
        return [((torch.randn(6, 50, generator=gen), torch.tensor([0.0, 0.05, 0.1, 0.5, 0.9, 1.0])), {})]
    if name == "linear":
        return [((r(7, 64), r(96, 64), r(96)), {}), ((r(2, 5, 128), r(64, 128), None), {})]
    if name == "greedy_sample":
        ties = r(4, 300)
        ties[:, 17] = ties[:, 250] = ties.max() + 1  # two maxima per row: the first one wins
        nan = r(3, 1000)
        nan[1, 400] = nan[1, 900] = float("nan")  # a NaN wins, its first index
        return [((r(5, 1000),), {}), ((ties,), {}), ((nan,), {}), ((r(1, 7),), {})]
    if name == "sampled_logprobs":  # float32 logits whatever the model dtype (the sampler's copy); no ties
        x = torch.randn(6, 1000, generator=gen) * 3
        chosen = torch.randint(0, 1000, (6,), generator=gen)
        wide = torch.randn(3, 4099, generator=gen)
        return [((x, chosen, 5), {}), ((x[:1], chosen[:1], 0), {}), ((wide, torch.tensor([0, 4098, 7]), 20), {})]
    if name == "sample_softmax":  # float32 logits; uniforms away from 0 and 1, a masked column, one row greedy-hot
        x = torch.randn(8, 1000, generator=gen) * 2
        x[:, 5] = float("-inf")
        x[3, 7] = 30.0
        temps = torch.tensor([1.0, 0.5, 2.0, 0.7, 1.0, 1.3, 0.1, 1.0])
        u = torch.rand(8, generator=gen) * 0.98 + 0.01
        return [((x, temps, u), {}), ((torch.randn(1, 4099, generator=gen), torch.tensor([0.8]), torch.tensor([0.5])),
                                      {})]
    raise KeyError(name)


def check_packed_linear(pack, linear, device: torch.device, dtype: torch.dtype) -> None:
    """``pack_linear_weight`` is checked through the platform's ``linear``: ``linear(x, pack(w), b)`` must match
    the reference ``x @ w.T + b``, with and without bias, for 2-D and 3-D inputs, leaving ``w`` untouched."""
    clause = "ops.pack_linear_weight"
    gen = torch.Generator().manual_seed(11)
    for i, (rows, k, n, bias) in enumerate(((7, 64, 96, True), (1, 128, 64, False), (33, 576, 960, True))):
        x = torch.randn(rows, k, generator=gen).to(dtype)
        w = torch.randn(n, k, generator=gen).to(dtype)
        b = torch.randn(n, generator=gen).to(dtype) if bias else None
        expected = reference.linear(x, w, b)
        w_dev = w.to(device)
        try:
            packed = pack(w_dev)
            got = linear(x.to(device), packed, None if b is None else b.to(device))
            got3 = linear(x.to(device).unsqueeze(0), packed, None if b is None else b.to(device))
        except Exception as exc:
            raise ContractViolation(clause, f"raised {type(exc).__name__}: {exc} on case {i}") from exc
        require(torch.equal(w_dev.cpu(), w), clause + ".inputs_unchanged", f"the weight was modified (case {i})")
        require(got.dtype == expected.dtype, clause, f"linear on the packed weight returned {got.dtype} (case {i})")
        assert_close(clause, got, expected, dtype, f"linear(x, pack(w)) (case {i})")
        assert_close(clause, got3.squeeze(0), expected, dtype, f"linear on a 3-D input (case {i})")


def check_gated_linear(pack, gated, device: torch.device, dtype: torch.dtype) -> None:
    """``pack_gated_linear_weight`` and ``gated_linear`` together: where the platform packs a gate/up weight,
    ``gated(x, *pack(w, b))`` must match the reference ``silu_and_mul(x @ w.T + b)``; where it declines (None),
    ``gated`` must still take the plain weight. Shapes whose halves are 16, 48 and 768 wide, with and without
    bias, 2-D and 3-D inputs; the weight and bias are left untouched."""
    clause = "ops.gated_linear"
    gen = torch.Generator().manual_seed(13)
    for i, (rows, k, d, bias) in enumerate(((7, 64, 16, True), (1, 128, 48, False), (33, 576, 768, True))):
        x = torch.randn(rows, k, generator=gen).to(dtype)
        w = (torch.randn(2 * d, k, generator=gen) / k ** 0.5).to(dtype)
        b = torch.randn(2 * d, generator=gen).to(dtype) if bias else None
        expected = reference.gated_linear(x, w, b)
        w_dev, b_dev = w.to(device), None if b is None else b.to(device)
        try:
            packed = pack(w_dev, b_dev)
            args = (w_dev, b_dev) if packed is None else packed
            got = gated(x.to(device), *args)
            got3 = gated(x.to(device).unsqueeze(0), *args)
        except Exception as exc:
            raise ContractViolation(clause, f"raised {type(exc).__name__}: {exc} on case {i}") from exc
        require(torch.equal(w_dev.cpu(), w) and (b is None or torch.equal(b_dev.cpu(), b)),
                clause + ".inputs_unchanged", f"the weight or bias was modified (case {i})")
        require(got.dtype == expected.dtype and got.shape == expected.shape, clause,
                f"returned {got.dtype} {tuple(got.shape)}, the reference {expected.dtype} {tuple(expected.shape)} "
                f"(case {i})")
        assert_close(clause, got, expected, dtype, f"gated_linear(x, pack(w, b)) (case {i})")
        assert_close(clause, got3.squeeze(0), expected, dtype, f"gated_linear on a 3-D input (case {i})")


def lora_case(rows: int, dtype: torch.dtype, gen: torch.Generator, in_features: int = 96, out_features: int = 200,
              max_rank: int = 16, ranks: tuple[int, ...] = (16, 4, 0, 7)) -> dict[str, object]:
    """Inputs of ``lora_shrink_expand`` as the LoRA layers store them (``b`` transposed): four slots padded to
    ``max_rank`` (zeros past
    each slot's rank; rank 0 is a slot whose adapter does not target the projection), rows of mixed slots with base
    rows (-1) among them, and ``y`` a column view inside a wider output, whose other columns must stay put."""
    a = torch.zeros(len(ranks), max_rank, in_features)
    b = torch.zeros(len(ranks), max_rank, out_features)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, in_features, generator=gen) / in_features ** 0.5
        b[s, :r] = torch.randn(r, out_features, generator=gen) / max_rank ** 0.5  # deltas of y's size
    slots = torch.randint(-1, len(ranks), (rows,), generator=gen)
    slots[0] = 0 if rows == 1 else slots[0]  # a single row still runs an adapter
    return {"x": torch.randn(rows, in_features, generator=gen).to(dtype),
            "y": torch.randn(rows, out_features + 8, generator=gen).to(dtype), "a": a.to(dtype), "b": b.to(dtype),
            "token_slots": slots, "active_slots": tuple(sorted(set(slots.tolist()) - {-1})),
            "ranks": torch.tensor(ranks, dtype=torch.int32)}


def check_lora_shrink_expand(fn, device: torch.device, dtype: torch.dtype,
                             row_counts: tuple[int, ...] = (1, 7, 64, 300)) -> None:
    """``lora_shrink_expand`` adds to ``y`` in place: after the call ``y`` must match the reference's, for 1, 7, 64
    and 300 rows of mixed slots (base rows and a rank-0 slot included), with and without ``ranks``; the columns of
    ``y``'s parent outside the view and every other input must be left untouched. ``row_counts`` narrows the rows
    for a kernel run where each row is slow (an interpreter), never for the contract run itself."""
    clause = "ops.lora_shrink_expand"
    gen = torch.Generator().manual_seed(17)
    for rows in row_counts:
        case = lora_case(rows, dtype, gen)
        for with_ranks in (True, False):
            parent = case["y"]
            expected = parent.clone()
            reference.lora_shrink_expand(case["x"], expected[:, 4:-4], case["a"], case["b"], case["token_slots"],
                                         case["active_slots"], case["ranks"] if with_ranks else None)
            dev = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
            got = dev["y"].clone()
            inputs = [dev[k] for k in ("x", "a", "b", "token_slots", "ranks")]
            before = [t.clone() for t in inputs]
            try:
                fn(dev["x"], got[:, 4:-4], dev["a"], dev["b"], dev["token_slots"], dev["active_slots"],
                   dev["ranks"] if with_ranks else None)
            except Exception as exc:
                raise ContractViolation(clause, f"raised {type(exc).__name__}: {exc} at {rows} rows") from exc
            for t, b in zip(inputs, before, strict=True):
                require(torch.equal(t, b), clause + ".inputs_unchanged", f"an input other than y was modified "
                        f"({rows} rows)")
            got = got.cpu()
            require(torch.equal(got[:, :4], parent[:, :4]) and torch.equal(got[:, -4:], parent[:, -4:]), clause,
                    f"wrote outside y's columns ({rows} rows)")
            assert_close(clause, got, expected, dtype, f"y after the call ({rows} rows, ranks given: {with_ranks})")


# (tokens, hidden, intermediate, experts, top_k): one token; an expert nobody picks; a hidden size that is not a
# multiple of 16; a batch large enough that every expert gets many rows.
MOE_CASES = ((1, 64, 32, 4, 2), (7, 96, 48, 8, 2), (33, 200, 64, 8, 3), (300, 128, 16, 6, 1))


def moe_case(tokens: int, hidden: int, inter: int, experts: int, top_k: int, dtype: torch.dtype,
             gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Inputs of ``fused_moe`` as ``SparseMoE`` makes them: softmax top-k routing weights in the hidden dtype, the
    experts stacked ``[E, 2I, H]`` / ``[E, H, I]``; the last expert is never chosen."""
    logits = torch.randn(tokens, experts, generator=gen)
    logits[:, -1] = float("-inf")
    weights, ids = torch.topk(logits.softmax(dim=-1), top_k, dim=-1)
    return {"hidden": torch.randn(tokens, hidden, generator=gen).to(dtype),
            "w13": (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5).to(dtype),
            "w2": (torch.randn(experts, hidden, inter, generator=gen) / inter ** 0.5).to(dtype),
            "topk_weights": weights.to(dtype), "topk_ids": ids}


def check_fused_moe(pack, fused, device: torch.device, dtype: torch.dtype) -> None:
    """``pack_fused_moe_weights`` and ``fused_moe`` together: ``fused(x, *pack(w13, w2), w, ids)`` where the
    platform packs, the plain weights where it declines (None), must match the reference for every case of
    ``MOE_CASES``; no input (the plain weights included) may change, and each token's rows must not depend on the
    batch beyond the dtype's tolerance (the first token alone against it inside the batch)."""
    clause = "ops.fused_moe"
    gen = torch.Generator().manual_seed(19)
    for i, shape in enumerate(MOE_CASES):
        case = moe_case(*shape, dtype, gen)
        expected = reference.fused_moe(*case.values(), "silu")
        dev = {k: v.to(device) for k, v in case.items()}
        before = {k: v.clone() for k, v in dev.items()}
        try:
            packed = pack(dev["w13"], dev["w2"], "silu")
            weights = (dev["w13"], dev["w2"]) if packed is None else packed
            got = fused(dev["hidden"], *weights, dev["topk_weights"], dev["topk_ids"], "silu")
            alone = fused(dev["hidden"][:1], *weights, dev["topk_weights"][:1], dev["topk_ids"][:1], "silu")
        except Exception as exc:
            raise ContractViolation(clause, f"raised {type(exc).__name__}: {exc} on case {i} {shape}") from exc
        for k, v in dev.items():
            require(torch.equal(v, before[k]), clause + ".inputs_unchanged", f"{k} was modified (case {i})")
        require(got.dtype == expected.dtype and got.shape == expected.shape, clause,
                f"returned {got.dtype} {tuple(got.shape)}, the reference {expected.dtype} {tuple(expected.shape)} "
                f"(case {i})")
        assert_close(clause, got, expected, dtype, f"fused_moe (case {i}: tokens, hidden, inter, experts, top_k = "
                                                   f"{shape}, packed: {packed is not None})")
        assert_close(clause, alone, expected[:1], dtype, f"fused_moe on the first token alone (case {i})")


def _flatten(x: object) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _flatten(item)]
    return []


def check_op(name: str, fn, device: torch.device, dtype: torch.dtype) -> None:
    """An override against the reference: same outputs within tolerance, and inputs left untouched (the
    reference is out-of-place and core may reuse an input after the call)."""
    clause = f"ops.{name}"
    gen = torch.Generator().manual_seed(7)
    ref_fn = getattr(reference, name)
    sampling = name in ("apply_top_k_top_p", "apply_min_p")
    for i, (args, kwargs) in enumerate(_op_inputs(name, dtype, gen)):
        expected = ref_fn(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
        dev_args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        before = [a.clone() for a in dev_args if isinstance(a, torch.Tensor)]
        try:
            got = fn(*dev_args, **kwargs)
        except Exception as exc:
            raise ContractViolation(clause, f"raised {type(exc).__name__}: {exc} on argument set {i}") from exc
        after = [a for a in dev_args if isinstance(a, torch.Tensor)]
        for j, (b, a) in enumerate(zip(before, after, strict=True)):
            b, a = b.cpu(), a.cpu()
            same = torch.equal(b, a) or (b.is_floating_point() and b.shape == a.shape
                                         and bool(((b == a) | (b.isnan() & a.isnan())).all()))
            require(same, clause + ".inputs_unchanged", f"argument {j} was modified in place (argument set {i})")
        exp_list, got_list = _flatten(expected), _flatten(got)
        require(len(exp_list) == len(got_list), clause,
                f"returned {len(got_list)} tensors, the reference returns {len(exp_list)} (argument set {i})")
        for k, (g, e) in enumerate(zip(got_list, exp_list, strict=True)):
            require(g.dtype == e.dtype, clause, f"output {k} dtype {g.dtype} != reference {e.dtype} (set {i})")
            if name == "sampled_logprobs":
                (require(torch.equal(g.cpu(), e), clause, f"output {k}: {g.cpu().tolist()}, the reference "
                         f"{e.tolist()} (argument set {i})") if not e.is_floating_point() else
                 assert_close(clause, g, e, torch.float32, f"output {k} (argument set {i})"))
            elif name in ("greedy_sample", "sample_softmax"):
                require(torch.equal(g.cpu(), e), clause,
                        f"picked {g.cpu().tolist()}, the reference {e.tolist()} (argument set {i})")
            elif sampling:
                masked_g, masked_e = torch.isinf(g.cpu()), torch.isinf(e)
                require(torch.equal(masked_g, masked_e), clause,
                        f"masks {int((masked_g != masked_e).sum())} logits differently from the reference (set {i})")
                assert_close(clause, g.cpu()[~masked_e], e[~masked_e], torch.float32, f"kept logits (set {i})")
            else:
                assert_close(clause, g, e, dtype, f"output {k} (argument set {i})")


# -- quantization kernels --------------------------------------------------------------------------------------
def quant_cases(gen: torch.Generator) -> list[tuple[object, dict[str, torch.Tensor]]]:
    """Small layers in the int4, int8 and fp8 layouts of ``QuantLinearSpec`` (weight-only, W8A8, per-channel
    FP8), with random codes and scales, as the loader would hand them to ``process_weights``."""
    from llmctl.plugins.types import QuantLinearSpec

    n, k, group = 48, 128, 32
    scales = torch.rand(n, k // group, generator=gen) * 0.02 + 0.005
    int4 = {"qweight": torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.int64).to(torch.uint8),
            "scales": scales, "mins": -8 * scales}
    int8 = {"qweight": torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int64).to(torch.int8),
            "scales": torch.rand(n, 1, generator=gen) * 0.01 + 0.001}
    fp8 = {"qweight": (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn),
           "scales": torch.rand(n, 1, generator=gen) * 0.01 + 0.001}
    return [
        (QuantLinearSpec("int4", k, n, 4, group), int4),
        (QuantLinearSpec("int8", k, n, 8, k), dict(int8)),
        (QuantLinearSpec("int8", k, n, 8, k, act="int8"), dict(int8)),
        (QuantLinearSpec("fp8", k, n, 8, k), fp8),
    ]


def check_quant_method(method, device: torch.device, dtype: torch.dtype) -> int:
    """``supports`` answers with a ``Support``; where it says yes, ``process_weights`` + ``apply`` match core's
    ``reference_linear`` on the same layer (a 1-row and a 7-row batch, with a bias), leave their inputs alone
    and return ``x``'s dtype. Returns how many layers the method ran."""
    from llmctl.quantization.reference import reference_linear

    gen = torch.Generator().manual_seed(7)
    ran = 0
    for spec, weights in quant_cases(gen):
        if spec.format != method.name:
            continue
        clause = f"quantization.{method.name}"
        try:
            answer = method.supports(spec, dtype)
        except Exception as exc:
            raise ContractViolation(clause, f"{method.kernel or method.name}: supports raised "
                                            f"{type(exc).__name__}: {exc}") from exc
        require(isinstance(answer, Support), clause, f"supports returned {type(answer).__name__}, not Support")
        if not answer:
            continue
        bias = torch.randn(spec.out_features, generator=gen).to(dtype)
        on_device = {name: t.to(device) for name, t in weights.items()}
        try:
            processed = method.process_weights(dict(on_device), spec)
        except Exception as exc:
            raise ContractViolation(clause, f"process_weights raised {type(exc).__name__}: {exc} ({spec})") from exc
        for rows in (1, 7):
            x = torch.randn(rows, spec.in_features, generator=gen).to(dtype)
            expected = reference_linear(x.float(), weights, bias.float(), spec)
            x_dev = x.to(device)
            try:
                got = method.apply(x_dev, processed, bias.to(device), spec)
            except Exception as exc:
                raise ContractViolation(clause, f"apply raised {type(exc).__name__}: {exc} ({spec})") from exc
            require(torch.equal(x_dev.cpu(), x), clause + ".inputs_unchanged", f"apply modified x ({spec})")
            require(got.dtype == dtype and tuple(got.shape) == (rows, spec.out_features), clause,
                    f"apply returned {got.dtype} {tuple(got.shape)}, expected {dtype} {(rows, spec.out_features)}")
            # Activation-quantizing formats round x per token: a kernel may round the other way at a tie.
            tol_dtype = torch.bfloat16 if spec.act else dtype
            assert_close(clause, got.float(), expected.float(), tol_dtype, f"apply vs reference_linear ({spec}, "
                                                                          f"{rows} rows)")
            if spec.out_features % 2 == 0 and method.fuses_silu_and_mul(processed, spec):
                fused = method.apply_silu_and_mul(x_dev, processed, bias.to(device), spec)
                want = reference.silu_and_mul(got.cpu().float()).to(dtype)
                require(fused.dtype == dtype and tuple(fused.shape) == (rows, spec.out_features // 2),
                        clause + ".silu_and_mul", f"apply_silu_and_mul returned {fused.dtype} {tuple(fused.shape)}")
                assert_close(clause + ".silu_and_mul", fused.cpu().float(), want.float(), dtype,
                             f"apply_silu_and_mul vs apply + silu_and_mul ({spec}, {rows} rows)")
        ran += 1
    return ran
