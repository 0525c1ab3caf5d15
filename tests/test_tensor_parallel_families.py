"""Tensor and pipeline parallelism for the native decoder families: two ranks on gloo, as two tensor-parallel
ranks or as two pipeline stages of one layer each, give the greedy tokens of one rank.

The ranks start once for all families and both splits (``tests.tp_family_rank`` loads the checkpoints in turn),
since starting two interpreters per family would cost more than the models themselves. Each family picks a
different split: fused q/k/v and gate/up in the checkpoint, Conv1D transposes, per-head fused q/k/v, ALiBi slopes
per rank, one KV head replicated over both ranks, soft-capping, plain and gated-GELU MLPs, and mixtures of experts
split by their intermediate columns, or (expert parallelism) placed whole on the ranks. Under pipeline parallelism
the stages differ in what they hold: the first embeds (learned positions, BLOOM's embedding norm, Gemma's scale), the
last norms and computes the logits (soft-capped, biased), and Gemma 2's layers alternate sliding and global windows
across the stages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._engine_util import one_torch_thread
from tests.family_factory import make_family_model
from tests.test_server_support import free_ports
from tests.tp_family_rank import EP_SUFFIX, EXPERTS_KEY, MAX_TOKENS, SMALL_KV, run_key
from tests.tp_rank import generate

REPO = Path(__file__).resolve().parent.parent
SPLIT_KINDS = ("gemma2", "phi3", "gpt2", "gpt_neox", "bloom", "falcon_mq", "mixtral", "qwen2_moe")
EP_KINDS = ("mixtral", "qwen2_moe")  # also run with enable_expert_parallel, in the same pair of ranks
# Pipeline stages split every family whose layers are self-contained, including those tensor parallelism refuses.
PP_KINDS = ("gemma2", "gpt2", "bloom", "falcon_mq", "mixtral", "olmo2", "deepseek_v2")
REFUSED = {"olmo2": "the olmo2 family uses a q/k RMSNorm over all heads",
           "deepseek_v2": "the deepseek_v2 family uses multi-head latent attention"}


def _family_checkpoint(kind: str, cache: Path, tok) -> Path:
    """The checkpoint test_model_families made in this session, or a new one (the same seed, so the same one)."""
    path = cache / f"family-{kind}"
    return path if (path / "model.safetensors").exists() else make_family_model(kind, path, tok)[0]


@pytest.fixture(scope="module")
def family_models(model_cache_dir, test_tokenizer) -> dict[str, Path]:
    return {kind: _family_checkpoint(kind, model_cache_dir, test_tokenizer)
            for kind in dict.fromkeys(SPLIT_KINDS + PP_KINDS)}


@pytest.fixture(scope="module")
def two_rank_outputs(family_models, tmp_path_factory) -> dict[str, list[dict] | str]:
    """run_key(model, tp, pp) -> rank 0's outputs (or its refusal), after checking that rank 1 produced the same;
    ``EXPERTS_KEY`` -> each rank's loaded experts per expert-parallel run."""
    tmp = tmp_path_factory.mktemp("two-rank-families")
    runs = [run_key(str(family_models[k]), tp=2) for k in SPLIT_KINDS] + \
        [run_key(str(family_models[k]) + EP_SUFFIX, tp=2) for k in EP_KINDS] + \
        [run_key(str(family_models[k]), pp=2) for k in PP_KINDS]
    ports = ",".join(str(p) for p in free_ports(len(runs)))
    procs, outs = [], []
    for rank in range(2):
        out = tmp / f"rank{rank}.json"
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.tp_family_rank", str(out), ports, *runs],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        outs.append(out)
    try:
        logs = [p.communicate(timeout=900)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    rank0, rank1 = (json.loads(o.read_text()) for o in outs)
    experts = [rank0.pop(EXPERTS_KEY), rank1.pop(EXPERTS_KEY)]
    assert rank0 == rank1, "the two ranks sampled differently"
    return rank0 | {EXPERTS_KEY: {run: [e[run] for e in experts] for run in runs if run.endswith(EP_SUFFIX)}}


@pytest.fixture(scope="module")
def one_rank_outputs(family_models) -> dict[str, list[dict]]:
    """kind -> one process's outputs, computed once for the tp=2, expert-parallel and pp=2 comparisons."""
    from llmctl import LLM

    class Outputs(dict):
        def __missing__(self, kind: str) -> list[dict]:
            with one_torch_thread():
                llm = LLM(str(family_models[kind]), dtype="float32", num_threads=1, seed=0, max_model_len=128,
                          kv_cache_memory=SMALL_KV)
                self[kind] = generate(llm, MAX_TOKENS)
                llm.llm_engine.shutdown()
            return self[kind]

    return Outputs()


def _assert_same(got: list[dict] | str, want: list[dict]) -> None:
    assert not isinstance(got, str), got
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        torch.testing.assert_close(torch.tensor(g["logprobs"]), torch.tensor(w["logprobs"]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", SPLIT_KINDS)
def test_tp2_family_matches_tp1(kind, family_models, two_rank_outputs, one_rank_outputs):
    _assert_same(two_rank_outputs[run_key(str(family_models[kind]), tp=2)], one_rank_outputs[kind])


@pytest.mark.parametrize("kind", EP_KINDS)
def test_expert_parallel_matches_tp1_and_each_rank_holds_its_experts(kind, family_models, two_rank_outputs,
                                                                      one_rank_outputs):
    """tp=2 with enable_expert_parallel (4 experts: 0-1 on rank 0, 2-3 on rank 1, dispatched by all_to_all over
    gloo) gives one rank's greedy tokens and logprobs; each rank loaded only its two experts, whole (the full
    moe_intermediate_size, not half of every expert)."""
    run = run_key(str(family_models[kind]) + EP_SUFFIX, tp=2)
    _assert_same(two_rank_outputs[run], one_rank_outputs[kind])
    inter = 32 if kind == "qwen2_moe" else 128  # family_factory's moe_intermediate_size / intermediate_size
    for rank, layers in enumerate(two_rank_outputs[EXPERTS_KEY][run]):
        assert layers, "no mixture-of-experts layer was found"
        for layer in layers:
            assert layer["experts"] == [2 * rank, 2 * rank + 1]
            assert layer["w13"][:2] == [2, 2 * inter]


@pytest.mark.parametrize("kind", PP_KINDS)
def test_pp2_family_matches_pp1(kind, family_models, two_rank_outputs, one_rank_outputs):
    _assert_same(two_rank_outputs[run_key(str(family_models[kind]), pp=2)], one_rank_outputs[kind])


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_family_without_split_is_refused_at_start_up(kind, model_cache_dir, test_tokenizer):
    """Refused before any peer is waited for: no launcher environment is needed to see the message."""
    from llmctl import LLM

    path = _family_checkpoint(kind, model_cache_dir, test_tokenizer)
    with pytest.raises(ValueError, match=rf"tensor_parallel_size: {REFUSED[kind]}"):
        LLM(str(path), tensor_parallel_size=2, distributed_executor_backend="external_launcher", num_threads=1)


def _rank1_moe(e: int, inter: int, hidden: int, expert_parallel: bool):
    """Rank 1 of 2's SparseMoE and random gate/up/down weights for ``e`` experts. Loading only: no collective runs,
    so no peer is needed."""
    from llmctl.models.base import ModelContext
    from llmctl.models.decoder import MoESpec
    from llmctl.models.moe import SparseMoE
    from llmctl.ops import Ops
    from llmctl.plugins.reference_attention import TorchReferenceAttention
    from llmctl.tensor_parallel import TensorParallelGroup

    gen = torch.Generator().manual_seed(0)
    gate, up = torch.randn(e, inter, hidden, generator=gen), torch.randn(e, inter, hidden, generator=gen)
    down = torch.randn(e, hidden, inter, generator=gen)
    ctx = ModelContext(ops=Ops.reference(), attention=TorchReferenceAttention(), dtype=torch.float32,
                       device=torch.device("cpu"), tp=TensorParallelGroup(rank=1, size=2),
                       expert_parallel=expert_parallel)
    moe = SparseMoE(hidden, MoESpec(num_experts=e, top_k=2, intermediate_size=inter), "silu", ctx)
    return moe, gate, up, down


def _load_experts(moe, layout: str, gate, up, down, per_expert=lambda i, name, w: w) -> None:
    """Feed the weights in one of the checkpoint layouts; ``per_expert`` may replace a per-expert tensor."""
    e, inter, hidden = gate.shape
    if layout == "per_expert":
        for i in range(e):
            for proj, w in (("gate_proj", gate[i]), ("up_proj", up[i]), ("down_proj", down[i])):
                name = f"experts.{i}.{proj}.weight"
                moe.load_expert_tensor(f"{i}.{proj}.weight", per_expert(i, name, w), name)
    elif layout == "stacked":
        moe.load_expert_tensor("stacked_w13.weight", torch.cat([gate, up], dim=1), "stacked_w13")
        moe.load_expert_tensor("stacked_w2.weight", down, "stacked_w2")
    else:
        moe.load_expert_tensor("dbrx_w1", gate.reshape(e * inter, hidden), "w1")
        moe.load_expert_tensor("dbrx_v1", up.reshape(e * inter, hidden), "v1")
        moe.load_expert_tensor("dbrx_w2", down.transpose(1, 2).reshape(e * inter, hidden), "w2")


@pytest.mark.parametrize("layout", ["per_expert", "stacked", "dbrx"])
def test_rank_reads_its_columns_of_every_expert(layout):
    """Rank 1 of 2 keeps the second half of every expert's intermediate columns, whichever way the checkpoint
    stores the experts (per-expert tensors, Granite-MoE's stacks, DBRX's flattened stacks)."""
    inter = 8
    moe, gate, up, down = _rank1_moe(3, inter, 5, expert_parallel=False)
    _load_experts(moe, layout, gate, up, down)
    half = slice(inter // 2, inter)
    assert torch.equal(moe.w13.data, torch.cat([gate[:, half], up[:, half]], dim=1))
    assert torch.equal(moe.w2.data, down[:, :, half])
    assert moe.missing_expert_tensors("mlp.w13") == [] and moe.missing_expert_tensors("mlp.w2") == []


class _Unreadable:
    """A lazy checkpoint tensor that fails when read: another rank's expert must be skipped, not read."""

    def __init__(self, name: str) -> None:
        self.name = name

    def read(self):
        raise AssertionError(f"{self.name} was read by a rank that does not hold it")

    read_slice = read


@pytest.mark.parametrize("layout", ["per_expert", "stacked", "dbrx"])
def test_expert_parallel_rank_reads_only_its_experts(layout):
    """With enable_expert_parallel, rank 1 of 2 keeps experts 2 and 3 of 4, whole, and never reads experts 0 and
    1's per-expert tensors; the stacked layouts are cut along the experts."""
    moe, gate, up, down = _rank1_moe(4, 6, 5, expert_parallel=True)
    assert moe.missing_expert_tensors("mlp.w2") == ["mlp.experts.2.down_proj", "mlp.experts.3.down_proj"]
    _load_experts(moe, layout, gate, up, down, per_expert=lambda i, name, w: w if i >= 2 else _Unreadable(name))
    assert torch.equal(moe.w13.data, torch.cat([gate[2:], up[2:]], dim=1))
    assert torch.equal(moe.w2.data, down[2:])
    assert moe.missing_expert_tensors("mlp.w13") == [] and moe.missing_expert_tensors("mlp.w2") == []


def test_quantized_family_group_that_a_split_would_cut_is_refused(model_cache_dir, test_tokenizer, tmp_path):
    """A quantized family checkpoint shards (tests/test_quantization_tensor_parallel.py), except where a rank's
    input columns of a row-parallel layer would cut a group: refused before any peer is waited for, naming the
    layer by the family's own module names, the unit and the setting."""
    from llmctl import LLM

    from tests.quant_checkpoints import write_gptq

    path, _ = write_gptq(_family_checkpoint("phi3", model_cache_dir, test_tokenizer), tmp_path / "gptq", 4, 64, False)
    with pytest.raises(ValueError, match=r"tensor_parallel_size: 2 splits layer model\.layers\.0\.self_attn\.o_proj "
                                         r"by its 64 input columns, 32 per rank, which is not a multiple of the gptq "
                                         r"group_size=64"):
        LLM(str(path), tensor_parallel_size=2, distributed_executor_backend="external_launcher", num_threads=1)


def test_expert_parallel_refusals_name_the_setting(family_models, monkeypatch, caplog):
    """Refused before any peer is waited for (no launcher environment needed): experts that do not divide over
    the ranks. A quantized model (its experts stay in the model dtype) and a model without experts get past the
    check to the launcher's missing environment; the latter ignores the setting, as vLLM does."""
    from llmctl import LLM
    from llmctl.config import EngineArgs

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    common = dict(distributed_executor_backend="external_launcher", num_threads=1, enable_expert_parallel=True)
    mixtral = str(family_models["mixtral"])
    with pytest.raises(ValueError, match=r"enable_expert_parallel: num_experts=4 does not split over the 8 ranks"):
        LLM(mixtral, tensor_parallel_size=8, **common)
    with pytest.raises(ValueError, match="external_launcher' expects each rank to be started by a launcher"):
        LLM(mixtral, tensor_parallel_size=2, quantization="int8", **common)
    with pytest.raises(ValueError, match=r"enable_expert_parallel: must be true or false"):
        EngineArgs(model=mixtral, enable_expert_parallel="yes")
    with caplog.at_level("INFO", logger="llmctl.expert_parallel"), \
            pytest.raises(ValueError, match="external_launcher' expects each rank to be started by a launcher"):
        LLM(str(family_models["phi3"]), tensor_parallel_size=2, **common)
    assert "has no mixture-of-experts layers; the setting is ignored" in caplog.text
