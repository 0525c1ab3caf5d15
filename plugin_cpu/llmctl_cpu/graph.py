"""Decode steps replayed from C: the CPU's analogue of CUDA graphs.

Why: a decode step of a 30-layer model makes ~270 kernel calls, and the Python between them (module calls, shape
checks, output allocation, ctypes argument conversion) cost a noticeable share of a 64-sequence step and about a
quarter of a single stream's (docs/performance.md). Core already describes the all-decode step against static buffers
(:class:`~llmctl.plugins.types.DecodeGraphSpec`); this runner runs that step once with the C kernels recording
their calls (and the embedding lookup, the one torch op a decode step computes), and from then on replays the
recorded calls with one C call per step (``llmctl_run_program``).

One recording serves every batch size up to the one it was made at: the row count of each call is replaced at
replay, and every kernel computes a row from that row's inputs alone (the property the engine's batch-invariance
tests hold them to), so no batch is padded and no per-size capture is needed. The recording keeps every tensor the
step allocated, so the addresses it holds stay valid; they are reused by each replay.

What makes a step unrecordable is refused at capture, and the engine then runs eagerly: any torch op that computes
on step data other than the embedding (a torch fallback of an op, an fp32 model's oneDNN linear), or a kernel call
whose row count is not the batch's. As a last check the first replay must reproduce the recording step's output
bit for bit, at the full batch and at one row.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from llmctl.plugins.types import DecodeGraphSpec
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llmctl_cpu import native

logger = logging.getLogger(__name__)

# aten ops a recorded step may run besides the C kernels: allocations, views, and constants built from host
# values that do not change between steps (the attention plan's row indices). Anything else would be baked into
# the recording or silently skipped by the replay.
_ALLOWED_OPS = frozenset({
    "empty", "empty_like", "empty_strided", "view", "_unsafe_view", "reshape", "_reshape_alias", "slice", "select",
    "split", "split_with_sizes", "unsqueeze", "squeeze", "t", "transpose", "permute", "expand", "alias", "detach",
    "as_strided", "arange", "lift_fresh", "lift_fresh_copy",
})
_NO_OP_WHEN_SAME = frozenset({"to", "contiguous"})


class NotRecordable(RuntimeError):
    """The decode step did something a replay could not repeat."""


class _StepRecorder(TorchDispatchMode):
    """Keeps every tensor the recorded step creates alive (their addresses go into the program), refuses torch
    ops that compute on step data, and records the embedding lookup as a C row gather."""

    def __init__(self, lib: native.NativeKernels) -> None:
        super().__init__()
        self.lib = lib
        self.keep: list[torch.Tensor] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "embedding":
            out = self._embedding(*args, **kwargs)
        elif name in _ALLOWED_OPS:
            out = func(*args, **kwargs)
        elif name in _NO_OP_WHEN_SAME and (out := func(*args, **kwargs)) is args[0]:
            pass  # a conversion to what the tensor already is: the tensor itself, nothing computed
        else:
            raise NotRecordable(f"the decode step runs torch op aten.{name}, which a replay would not repeat")
        self.keep.extend(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out

    def _embedding(self, weight: torch.Tensor, ids: torch.Tensor, *_: Any) -> torch.Tensor:
        """F.embedding as the C row gather, which the recording (still open around this) records."""
        if weight.dim() != 2 or not weight.is_contiguous() or ids.dim() != 1 or ids.dtype != torch.int64 \
                or not ids.is_contiguous():
            raise NotRecordable("the embedding lookup is not a contiguous [vocab, d] table indexed by int64 ids")
        out = torch.empty((ids.shape[0], weight.shape[1]), dtype=weight.dtype)
        self.lib.gather_rows(weight, ids, out)
        return out


class CpuDecodeGraphRunner:
    """:class:`~llmctl.plugins.types.DecodeStepRunner` for the CPU plugin: record once, replay per step."""

    def __init__(self, spec: DecodeGraphSpec, lib: native.NativeKernels) -> None:
        self.spec = spec
        self.lib = lib
        self.max_batch = max(spec.batch_sizes)
        self.static = dict(spec.static_inputs)
        self.program: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.reason = "not captured yet"
        self._keep: list[torch.Tensor] = []

    # -- DecodeStepRunner ------------------------------------------------------------------------------------
    def capture(self) -> None:
        """Record the step at the largest batch; a step that cannot be recorded leaves the runner empty (every
        ``padded_size`` is None, so core runs eagerly) and says why in the log."""
        try:
            self._record()
        except NotRecordable as exc:
            self.program, self.output, self._keep = None, None, []
            self.reason = str(exc)
            logger.info("CPU decode graphs off: %s", exc)
            return
        self.reason = f"recorded {self.program.shape[0]} kernel calls at {self.max_batch} rows"
        logger.info("CPU decode graphs: %s", self.reason)

    def padded_size(self, n: int) -> int | None:
        return n if self.program is not None and 1 <= n <= self.max_batch else None

    def run(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Copy the live batch into the leading rows (and columns) of the static buffers and replay at its size."""
        assert self.program is not None and self.output is not None, "run() before a successful capture()"
        n = inputs["input_ids"].shape[0]
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"decode graph: batch of {n} sequences, recorded for 1..{self.max_batch}")
        with torch.inference_mode():  # the static buffers are inference tensors (core made them so)
            for name, live in inputs.items():
                dst = self.static[name]
                if live.dim() == 1:
                    dst[:n].copy_(live)
                else:
                    dst[:n, :live.shape[1]].copy_(live)
        self._replay(n)
        return self.output[:n]

    # -- recording ---------------------------------------------------------------------------------------------
    def _views(self, batch: int) -> dict[str, torch.Tensor]:
        return {k: t[: batch + self.spec.extra_rows.get(k, 0)] for k, t in self.static.items()}

    def _fill_recording_inputs(self) -> None:
        """Deterministic inputs that touch nothing a request owns: every row attends over one key, slot 0 of block
        0, which row 0 writes in each layer first (no request exists yet when core captures), so the recording's
        output is a fixed function of the weights for the replay check to compare against."""
        s = self.static
        s["input_ids"].copy_(torch.arange(s["input_ids"].shape[0]) % 7)
        s["positions"].zero_()
        s["slot_mapping"].fill_(-1)
        s["slot_mapping"][0] = 0
        s["seq_lens"].fill_(1)
        s["block_tables"].zero_()

    def _record(self) -> None:
        self._fill_recording_inputs()
        calls: list[tuple[int, tuple[Any, ...]]] = []
        recorder = _StepRecorder(self.lib)
        with torch.inference_mode(), self.lib.recording(calls), recorder:
            output = self.spec.forward(**self._views(self.max_batch))
        self._keep = recorder.keep
        if not calls:
            raise NotRecordable("the decode step made no C kernel calls")
        if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != self.max_batch \
                or not output.is_contiguous():
            raise NotRecordable("the decode step's output is not a contiguous [batch, hidden] tensor")
        words = []
        for code, args in calls:
            rows = args[native.ROWS_ARG[code]]
            if rows != self.max_batch:
                raise NotRecordable(f"{native.OPCODE_NAMES[code]} ran over {rows} rows in a step of "
                                    f"{self.max_batch}")
            words.append(native.encode_call(code, args))
        self.program = torch.tensor(words, dtype=torch.int64)
        self.output = output
        expect = output.clone()
        self._replay(self.max_batch)
        if not torch.equal(output, expect):
            raise NotRecordable("replaying the recorded step did not reproduce its output")
        self._replay(1)
        if not torch.equal(output[:1], expect[:1]):
            raise NotRecordable("replaying the recorded step at one row did not reproduce its first row")

    def _replay(self, rows: int) -> None:
        assert self.program is not None
        failed, code = self.lib.run_program(self.program, rows)
        if failed >= 0:
            op = native.OPCODE_NAMES.get(int(self.program[failed, 0]), "?")
            raise RuntimeError(f"decode graph: kernel call {failed} ({op}) failed with code {code}: an input id, "
                               "position, KV slot or block id is out of range, or scratch memory ran out")


def make_runner(spec: DecodeGraphSpec) -> CpuDecodeGraphRunner | None:
    lib = native.kernels()
    return None if lib is None else CpuDecodeGraphRunner(spec, lib)

