"""The CPU kernels compiled for other x86 targets, once per test session.

Several tests need kernels.c built for a host kind other than this one (a generic x86-64 build, AVX2 + FMA, AVX-512
without and with bf16 dot products): to check that every such host builds warning-free, and to run the builds this
CPU can execute against the reference. Each build is a full optimised compile of every kernel, the most expensive
single step of the suite, so each target is compiled once, with the same flags as the product (plus ``-Wall``, whose
warnings are kept for the build test; at -O1 for a target this CPU cannot execute); the build test starts all of
them side by side on the host's cores. The builds land in a directory of the temp dir keyed by the sources, the
compiler and the flags, under a file lock per target, so that the suite's worker processes (pytest-xdist) share one
compile of each target instead of one each, and a rerun with unchanged sources compiles nothing.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

TARGETS = ("x86-64", "x86-64-v3", "skylake-avx512", "cooperlake")
# what /proc/cpuinfo must list for this host to execute a target's build
BUILD_NEEDS = {"x86-64-v3": ("avx2", "fma"), "skylake-avx512": ("avx512f", "avx512bw", "avx512vl"),
               "cooperlake": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")}
COMPILE_TIMEOUT_S = 600


@dataclass(frozen=True)
class TargetBuild:
    target: str
    so: Path
    returncode: int
    stderr: str


_lock = threading.Lock()
_futures: dict[str, Future[TargetBuild]] = {}
_pool: ThreadPoolExecutor | None = None
_dir: Path | None = None


def _build_dir(cc: str) -> Path:
    from llmctl_cpu import native

    key = hashlib.sha256(b"\0".join([*(p.read_bytes() for p in native.source_files()), cc.encode(),
                                      native._compiler_version(cc).encode(), " ".join(native.CFLAGS).encode()]))
    out = Path(tempfile.gettempdir()) / f"llmctl-target-builds-{key.hexdigest()[:16]}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def host_can_run(target: str) -> bool:
    from llmctl_cpu.platform import cpu_info

    return all(flag in cpu_info().flags for flag in BUILD_NEEDS.get(target, ()))


def _compile(cc: str, target: str, out_dir: Path) -> TargetBuild:
    """Compile ``target`` unless another process of this suite already did (its result is read back).

    A build this host can execute gets the product's flags exactly, since tests run it against the reference. A
    build it cannot execute is only checked to compile warning-free, at -O1: the same front end, the same errors
    and nearly all the same warnings for a third of the compile time (each full -O3 compile of the unity build is
    about a minute of one core); hosts that can execute that target compile it at -O3 and run it."""
    from llmctl_cpu import native

    check_only = not host_can_run(target)
    suffix = "-check" if check_only else ""
    so, result = out_dir / f"kernels-{target}{suffix}.so", out_dir / f"kernels-{target}{suffix}.json"
    with open(out_dir / f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = json.loads(result.read_text()) if result.exists() else None
        if done is not None and (done["returncode"] != 0 or so.exists()):
            return TargetBuild(target, so, done["returncode"], done["stderr"])
        flags = [f"-march={target}" if f == "-march=native" else f for f in native.CFLAGS]
        if check_only:
            flags = ["-O1" if f.startswith("-O") else f for f in flags]
        tmp = out_dir / f"kernels-{target}{suffix}.{os.getpid()}.so"
        proc = subprocess.run([cc, *flags, "-Wall", "-o", str(tmp), str(native.SOURCE), "-lm"], capture_output=True,
                              text=True, timeout=COMPILE_TIMEOUT_S)
        if proc.returncode == 0:
            os.replace(tmp, so)
        tmp.unlink(missing_ok=True)
        result.write_text(json.dumps({"returncode": proc.returncode, "stderr": proc.stderr}))
    return TargetBuild(target, so, proc.returncode, proc.stderr)


def _compiler_or_skip() -> str:
    from llmctl_cpu import native

    cc = native._compiler()
    if cc is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs a C compiler targeting x86-64")
    return cc


def build(target: str, alongside: tuple[str, ...] = ()) -> TargetBuild:
    """The compile of ``target``, whatever its outcome; ``alongside`` starts those targets' compiles too, so that
    a test that will ask for them next finds them done or under way."""
    global _pool, _dir
    cc = _compiler_or_skip()
    with _lock:
        if _pool is None:
            _dir = _build_dir(cc)
            _pool = ThreadPoolExecutor(max_workers=max(1, min(len(TARGETS), os.cpu_count() or 1)))
        assert _dir is not None
        for name in (target, *alongside):
            if name not in _futures:
                _futures[name] = _pool.submit(_compile, cc, name, _dir)
        future = _futures[target]
    return future.result()


def runnable(target: str):
    """The kernels built for ``target`` and loaded, or a skip where this host cannot execute that build."""
    from llmctl_cpu import native

    _compiler_or_skip()
    if not host_can_run(target):
        pytest.skip(f"this host cannot run a {target} build")
    done = build(target)
    assert done.returncode == 0, done.stderr[-2000:]
    return native.NativeKernels(ctypes.CDLL(str(done.so)), done.so)
