"""``llmctl doctor``: what is installed, what works here, and what ``llmctl serve`` would pick.

Everything is gathered into one plain dict (the ``--json`` output); the human view renders the same dict, so
the two can never disagree.
"""

from __future__ import annotations

import platform as py_platform
import sys
from dataclasses import asdict
from importlib import metadata
from typing import Any

TYPICAL_HEAD_SIZE = 64
TYPICAL_BLOCK_SIZE = 16


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def collect() -> dict[str, Any]:
    from llmctl.plugins import get_plugin_manager

    pm = get_plugin_manager()
    report: dict[str, Any] = {
        "versions": {"python": py_platform.python_version(), "llmctl-core": _dist_version("llmctl-core"),
                     "llmctl-server": _dist_version("llmctl-server"), "llmctl-cli": _dist_version("llmctl-cli"),
                     "torch": _dist_version("torch"), "transformers": _dist_version("transformers")},
        "plugins": [], "platforms": [], "checks": [], "hints": [],
        "selected": {"platform": None, "attention_backend": None, "error": None},
    }
    for info in pm.plugins.values():
        report["plugins"].append({k: v for k, v in asdict(info).items()})
        if info.broken:
            report["hints"].append(f"plugin {info.name!r} is broken ({info.error}); reinstall or upgrade "
                                   f"{info.distribution or info.name}, or disable it with "
                                   f"LLMCTL_DISABLE_PLUGINS={info.name}")
    for entry in sorted(pm.registry.platforms.values(), key=lambda e: -e.item.priority):
        plat = entry.item
        probe = pm.probe(plat.name)
        report["platforms"].append({
            "name": plat.name, "device_type": plat.device_type, "priority": plat.priority, "plugin": entry.plugin,
            "available": bool(probe.available), "reason": probe.reason,
            "devices": [_jsonable(asdict(d)) for d in probe.devices], "details": _jsonable(probe.details),
            "dtypes": [str(d).replace("torch.", "") for d in _safe(plat.supported_dtypes, [])],
            "emulated_dtypes": [str(d).replace("torch.", "") for d in _safe(plat.emulated_dtypes, [])],
            "attention_backends": [b.name for b in pm.registry.backends_for(plat.name)],
            # weight format -> the platform's own kernel; formats not listed run on core's torch reference
            "quantization_kernels": pm.registry.quant_formats_for(plat.name),
            # routed experts of these methods stay quantized, run through the kernels above
            "quantized_moe": _quantized_moe(),
            # what tensor parallelism's all-reduce and all-gather run on there (None: tensor_parallel_size 1 only)
            "communicator": _communicator(pm.registry, plat.name),
            "kv_cache_dtypes": _kv_cache_dtypes(pm, plat),
        })
    try:
        chosen = pm.select_platform(None)
        report["selected"]["platform"] = chosen.name
        dtype = (_safe(chosen.supported_dtypes, []) or [None])[0]
        if dtype is not None:
            backend = pm.select_attention_backend(chosen, dtype, TYPICAL_HEAD_SIZE, TYPICAL_BLOCK_SIZE)
            report["selected"]["attention_backend"] = backend.name
            report["selected"]["for"] = {"dtype": str(dtype).replace("torch.", ""), "head_size": TYPICAL_HEAD_SIZE,
                                         "block_size": TYPICAL_BLOCK_SIZE}
    except Exception as exc:  # reported, not raised: explaining this is doctor's whole job
        report["selected"]["error"] = str(exc)
    for entry in pm.registry.doctor_checks:
        check = entry.item
        try:
            res = check.run()
            row = {"name": check.name, "plugin": entry.plugin, "ok": bool(res.ok), "message": res.message,
                   "hint": res.hint}
        except Exception as exc:
            row = {"name": check.name, "plugin": entry.plugin, "ok": False,
                   "message": f"check raised {type(exc).__name__}: {exc}", "hint": ""}
        report["checks"].append(row)
        if not row["ok"] and row["hint"]:
            report["hints"].append(f"{check.name}: {row['hint']}")
    if not report["platforms"]:
        report["hints"].append("no platform plugin is installed: pip install llmctl-cpu (or llmctl-cuda, ...)")
    elif report["selected"]["platform"] is None:
        report["hints"].append("no platform is usable here; see each platform's reason above")
    from llmctl_cli.default_model import INSTALL_HINT, default_model_path

    default = default_model_path()
    report["default_model"] = str(default) if default else None
    if default is None:
        report["hints"].append(f"`llmctl serve` without a model needs the default model: {INSTALL_HINT}")
    report["ok"] = report["selected"]["platform"] is not None
    return report


def _quantized_moe() -> str:
    """The methods whose routed experts load quantized, and the MoE method that runs them (core's, per platform
    through its linear kernels)."""
    from llmctl.quantization.moe import MOE_KERNEL, MOE_METHODS

    return f"{', '.join(MOE_METHODS)} ({MOE_KERNEL})"


def _communicator(registry: Any, platform: str) -> dict[str, Any] | None:
    comm = registry.communicator_for(platform)
    if comm is None:
        return None
    backend = getattr(comm, "backend_name", None)
    return {"name": comm.name, "backend": _safe(backend, None) if callable(backend) else None}


def _kv_cache_dtypes(pm: Any, plat: Any) -> dict[str, str]:
    """8-bit KV cache dtype -> the attention backend that would read it on this platform (the first, by priority,
    whose ``supports`` accepts the dtype's feature; the torch reference reads them all)."""
    from llmctl.kv.cache_dtype import KV_CACHE_DTYPES, kv_dtype_name, kv_feature, kv_storage_dtype

    dtype = (_safe(plat.supported_dtypes, []) or [None])[0]
    found: dict[str, str] = {}
    if dtype is None:
        return found
    for name in KV_CACHE_DTYPES:
        storage = kv_storage_dtype(name, dtype)
        feature = kv_feature(storage)
        if feature is None or kv_dtype_name(storage) in found:  # auto, and fp8 (the same as fp8_e4m3)
            continue
        features = frozenset({"prefix_caching", "chunked_prefill", feature})
        for backend in pm.registry.backends_for(plat.name):
            if _safe(lambda b=backend, f=features: bool(b.supports(dtype, TYPICAL_HEAD_SIZE, TYPICAL_BLOCK_SIZE, f)),
                     False):
                found[kv_dtype_name(storage)] = backend.name
                break
    return found


def _safe(fn: Any, fallback: Any) -> Any:
    try:
        return fn()
    except Exception:
        return fallback


def render(report: dict[str, Any], console: Any) -> None:
    """The report for a person: short lines that wrap at any width (checked at 80 and 120 columns), words
    instead of Python reprs. Everything, capabilities included, stays in ``--json``."""
    from rich.table import Table

    v = report["versions"]
    console.print(f"[bold]llmctl doctor[/bold]  core {v['llmctl-core']}  server {v['llmctl-server']}  "
                  f"cli {v['llmctl-cli']}  torch {v['torch']}  python {v['python']} ({sys.platform})")
    t = Table(title="Plugins", title_justify="left", show_lines=False)
    for col in ("name", "distribution", "version", "status"):
        t.add_column(col, overflow="fold")
    for pl in report["plugins"]:
        status = "[red]broken[/red]: " + str(pl["error"]) if pl["broken"] else (
            "[yellow]disabled[/yellow]" if pl["disabled"] else "[green]ok[/green]")
        t.add_row(pl["name"], pl["distribution"] or "-", pl["version"] or "-", status)
    console.print(t)

    console.print("[bold]Platforms[/bold] (highest priority first)")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for pf in report["platforms"]:
        lines = ["[green]available[/green]" if pf["available"] else f"[red]unavailable[/red]: {pf['reason'] or '?'}"]
        if pf["available"] and pf["reason"]:
            lines.append(pf["reason"])
        lines += [_device_line(d) for d in pf["devices"]]
        if pf.get("dtypes"):
            lines.append("dtypes: " + ", ".join(pf["dtypes"])
                         + (f" (emulated, slower: {', '.join(pf['emulated_dtypes'])})"
                            if pf.get("emulated_dtypes") else ""))
        lines.append("attention: " + (", ".join(pf["attention_backends"]) or "-"))
        quant = ", ".join(f"{fmt}: {kernel}" for fmt, kernel in sorted(pf.get("quantization_kernels", {}).items()))
        lines.append("quantization: " + (quant or "torch reference"))
        if pf.get("quantized_moe"):
            lines.append("quantized MoE experts: " + pf["quantized_moe"])
        comm = pf.get("communicator")
        lines.append("tensor parallel: " + (
            f"communicator {comm['name']}" + (f" (torch.distributed {comm['backend']})"
                                              if comm.get("backend") and comm["backend"] != comm["name"] else "")
            if comm else "none (tensor_parallel_size 1 only)"))
        kv = ", ".join(f"{name}: {backend}" for name, backend in pf.get("kv_cache_dtypes", {}).items())
        lines.append("8-bit KV cache: " + (kv or "-"))
        grid.add_row(f"[bold]{pf['name']}[/bold]", "\n".join(lines))
    console.print(grid)

    sel = report["selected"]
    if sel["platform"]:
        extra = f" (for {sel['for']['dtype']}, head size {sel['for']['head_size']})" if sel.get("for") else ""
        console.print(f"serve would use platform [bold]{sel['platform']}[/bold] with attention backend "
                      f"[bold]{sel['attention_backend'] or '?'}[/bold]{extra}")
    if sel["error"]:
        console.print(f"[red]selection:[/red] {sel['error']}")
    if report["checks"]:
        console.print("[bold]Checks[/bold]")
        checks = Table.grid(padding=(0, 2))
        checks.add_column(no_wrap=True)
        checks.add_column(overflow="fold")
        for c in report["checks"]:
            mark = "[green]ok[/green]  " if c["ok"] else "[red]FAIL[/red]"
            checks.add_row(mark, f"{c['name']}: {c['message']}")
        console.print(checks)
    console.print(f"default model: {report['default_model'] or 'not installed'}", overflow="fold")
    for h in report["hints"]:
        console.print(f"[yellow]hint:[/yellow] {h}", overflow="fold")


def _device_line(d: dict[str, Any]) -> str:
    """"#0 AMD EPYC 9R14, 14.7 GiB free of 23.5 GiB: 2 physical cores; AVX-512 + bf16 dot products, no AMX".
    A platform that gives no summary gets its scalar capabilities as words; nested ones stay in --json."""
    head = f"#{d.get('index')} {d.get('name')}"
    if d.get("total_memory"):
        free = d.get("free_memory")
        head += f", {_gib(free) + ' free of ' if free else ''}{_gib(d['total_memory'])}"
    summary = d.get("summary") or ", ".join(
        f"{k.replace('_', ' ')} {v}" for k, v in (d.get("capabilities") or {}).items()
        if isinstance(v, (str, int, float)) and not isinstance(v, bool))
    return f"{head}: {summary}" if summary else head


def _gib(n: int | None) -> str:
    return f"{(n or 0) / 2**30:.1f} GiB"
