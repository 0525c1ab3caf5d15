"""The documentation site builds with ``mkdocs build --strict`` (broken links, missing pages or API objects fail),
and its generated pages carry what they are generated from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_mkdocs_strict_build(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is missing: pip install -r requirements-test.txt")
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(REPO / "mkdocs.yml"),
                        "-d", str(site)], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    cli = (site / "cli" / "index.html").read_text()
    for flag in ("--metrics-prefix", "--no-web-ui", "--otlp-traces-endpoint", "--shutdown-timeout"):
        assert flag in cli, flag
    for command in ("llmctl-serve", "llmctl-generate", "llmctl-bench"):
        assert f'id="{command}"' in cli, command
    api = (site / "api" / "index.html").read_text()
    for obj in ("llmctl.entrypoints.llm.LLM", "llmctl.sampling_params.SamplingParams", "llmctl.config.EngineArgs",
                "llmctl.engine.async_llm.AsyncLLM", "llmctl_server.app.build_app"):
        assert f'id="{obj}"' in api, obj
    for page in ("quickstart", "plugins", "performance", "reliability", "deployment", "distributed"):
        assert (site / page / "index.html").is_file(), page


def test_readme_links_the_docs_site_and_keeps_its_setup_commands():
    readme = (REPO / "README.md").read_text()
    assert "docs/index.md" in readme and "mkdocs" in readme
    assert readme.count("```bash\nmake serve\n```") == 1 and readme.count("```bash\nmake test\n```") == 1
