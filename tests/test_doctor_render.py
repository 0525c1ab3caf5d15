"""``llmctl doctor`` as a person reads it, at 80 and 120 columns: no Python reprs, no line past the width, and
the CPU's vector units in words; ``--json`` keeps every detail."""

from __future__ import annotations

import pytest
from llmctl_cli import doctor
from llmctl_cpu.platform import isa_summary
from rich.console import Console


@pytest.fixture(scope="module")
def report():
    return doctor.collect()


@pytest.mark.parametrize("width", [80, 120])
def test_doctor_renders_for_a_person(report, width):
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    doctor.render(report, console)
    text = console.export_text()
    assert all(len(line) <= width for line in text.splitlines()), text
    assert "{'" not in text and "': " not in text and "True" not in text, text
    cpu = next(p for p in report["platforms"] if p["name"] == "cpu")
    if cpu["available"]:
        isa = cpu["devices"][0]["capabilities"]["isa"]  # --json keeps the flags
        assert isinstance(isa, dict) and "avx512f" in isa
        flat = " ".join(text.split())  # the phrase may wrap at 80 columns
        if isa["avx512f"]:
            assert ("no AMX" in flat) != isa["amx_tile"], flat
        else:  # AVX2-only hosts (e.g. AMD EPYC Zen 3) name what they lack instead
            assert "no AVX-512" in flat, flat
        assert isa_summary({flag for flag, present in isa.items() if present}) in flat, flat



def test_doctor_names_each_platforms_communicator(report):
    """Which collective backend tensor parallelism would use on each platform, in --json and in words."""
    by_name = {p["name"]: p for p in report["platforms"]}
    assert by_name["cpu"]["communicator"] == {"name": "gloo", "backend": "gloo"}
    if "cuda" in by_name:
        assert by_name["cuda"]["communicator"]["backend"] == "nccl"
    console = Console(width=120, record=True, color_system=None, force_terminal=False)
    doctor.render(report, console)
    assert "tensor parallel: communicator gloo" in console.export_text()
