"""Broken plugins installed for real (a temp ``*.dist-info`` with entry points on PYTHONPATH): the server still
starts on the remaining platforms, and ``llmctl doctor`` names each problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
from llmctl.plugins import API_VERSION

from tests.reliability.conftest import ROOT, record

LLMCTL = str(Path(sys.executable).parent / "llmctl")
BROKEN = {
    "rel_import_error": ("tests.fake_plugins.import_error", ["import failed", "libfakeaccel.so"]),
    "rel_malformed": ("tests.fake_plugins.malformed", ["malformed", "AttentionBackend"]),
    "rel_old_api": ("tests.fake_plugins.old_api", ["1.3", API_VERSION]),
}


def _install_fakes(site: Path) -> dict[str, str]:
    dist = site / "llmctl_reliability_fakes-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llmctl-reliability-fakes\nVersion: 0.1\n")
    lines = ["[llmctl.plugins]"] + [f"{name} = {mod}" for name, (mod, _) in BROKEN.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "LLMCTL_PLUGINS": "", "LLMCTL_DISABLE_PLUGINS": ""}


def test_broken_plugins_server_starts_and_doctor_names_them(server_factory, tiny_llama_dir, tmp_path):
    env = _install_fakes(tmp_path / "site")
    env = {k: v for k, v in env.items() if v}  # empty allow/deny lists would mean "none"
    base_env = {k: v for k, v in os.environ.items() if k not in ("LLMCTL_PLUGINS", "LLMCTL_DISABLE_PLUGINS")}
    srv = server_factory(tiny_llama_dir, env=env)
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "plugins", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text
    out = subprocess.run([LLMCTL, "doctor", "--json"], capture_output=True, text=True, timeout=120,
                         env={**base_env, **env})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    plugins = {p["name"]: p for p in report["plugins"]}
    for name, (_, needles) in BROKEN.items():
        assert name in plugins, sorted(plugins)
        assert plugins[name]["broken"], plugins[name]
        for needle in needles:
            assert needle in plugins[name]["error"], (name, plugins[name]["error"])
        assert any(name in h for h in report["hints"]), report["hints"]
    assert report["selected"]["platform"] is not None
    assert "fake-malformed" not in {p["name"] for p in report["platforms"]}
    assert "fake-old-api" not in {p["name"] for p in report["platforms"]}
    human = subprocess.run([LLMCTL, "doctor"], capture_output=True, text=True, timeout=120,
                           env={**base_env, **env, "COLUMNS": "250"})
    for name in BROKEN:
        assert name in human.stdout, human.stdout
    record("broken_plugins", broken=sorted(BROKEN), platform=report["selected"]["platform"],
           backend=report["selected"]["attention_backend"], server_ok=True)
