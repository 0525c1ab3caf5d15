"""Quantized checkpoints split over two tensor-parallel ranks on gloo: for every method, the ranks' greedy tokens
equal one rank's on the same checkpoint in float32. Column-parallel layers (q/k/v, gate/up) hold their rows of the
packed weights, scales and zeros; row-parallel ones (o_proj, down_proj) their input columns in whole groups and
blocks (GPTQ act-order layers regroup the rank's columns). One pair of rank processes serves every checkpoint in
turn while this process computes the single-rank references. Splits that would cut a group or a GGUF block are
refused before any rank starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._engine_util import one_torch_thread
from tests.model_factory import make_tiny_model
from tests.quant_checkpoints import write_awq, write_compressed_tensors, write_gguf, write_gptq
from tests.tp_rank import generate

REPO = Path(__file__).resolve().parent.parent

# Row-parallel layers (attn_output, ffn_down) in 32-value blocks: at tp=2 each rank holds 128 of 256 columns. The
# column-parallel ones take K-quants too (a rank holds whole rows), and the q/k/v of layer 0 mix three types.
GGUF_TP_TYPES = {
    "0.attn_q": "Q4_K", "0.attn_k": "Q6_K", "0.attn_v": "Q8_0", "0.attn_output": "Q4_0", "0.ffn_gate": "Q5_K",
    "0.ffn_up": "Q5_K", "0.ffn_down": "Q5_1",
    "1.attn_q": "Q2_K", "1.attn_k": "Q2_K", "1.attn_v": "Q2_K", "1.attn_output": "Q8_0", "1.ffn_gate": "Q4_1",
    "1.ffn_up": "Q4_1", "1.ffn_down": "Q5_0",
}

# id -> (checkpoint writer, quantization argument); the writers take (base, out dir, tokenizer)
CASES = {
    "ct-w4a16-g32": (lambda b, o, t: write_compressed_tensors(b, o, "W4A16", group_size=32)[0], None),
    "ct-w8a16-asym-g64": (lambda b, o, t: write_compressed_tensors(b, o, "W8A16", group_size=64,
                                                                   symmetric=False)[0], None),
    "ct-w8a8-int8": (lambda b, o, t: write_compressed_tensors(b, o, "W8A8")[0], None),
    "ct-fp8-static": (lambda b, o, t: write_compressed_tensors(b, o, "FP8")[0], None),
    "gptq-4bit-g32-act-order": (lambda b, o, t: write_gptq(b, o, 4, 32, True)[0], None),
    "gptq-8bit-g64": (lambda b, o, t: write_gptq(b, o, 8, 64, False)[0], None),
    "awq-g64": (lambda b, o, t: write_awq(b, o, 64)[0], None),
    "int8-at-load": (lambda b, o, t: b, "int8"),
    "fp8-at-load": (lambda b, o, t: b, "fp8"),
    "gguf": (lambda b, o, t: write_gguf(o / "tiny.gguf", t, GGUF_TP_TYPES, hidden=256, ffn=256), "gguf"),
}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, test_tokenizer):
    """(single-rank outputs, each rank's results) by case id."""
    root = tmp_path_factory.mktemp("quant_tp")
    base = make_tiny_model("llama", root / "base", test_tokenizer, hidden_size=128, intermediate_size=256)
    models = {}
    for cid, (write, quant) in CASES.items():
        (root / cid).mkdir()
        models[cid] = (str(write(base, root / cid, test_tokenizer)), quant)
    cases = [{"id": cid, "model": m, "quantization": q, "port": port}
             for (cid, (m, q)), port in zip(models.items(), _free_ports(len(models)), strict=True)]
    (root / "cases.json").write_text(json.dumps(cases))
    procs, outs = [], []
    for rank in range(2):
        out = root / f"rank{rank}.json"
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.tp_quant_rank", str(root / "cases.json"),
                                       str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
        outs.append(out)
    try:
        from llmctl import LLM

        refs = {}
        with one_torch_thread():  # while the ranks run
            for cid, (model, quant) in models.items():
                llm = LLM(model, quantization=quant, dtype="float32", num_threads=1, seed=0, max_model_len=128,
                          kv_cache_memory=8 << 20)
                refs[cid] = generate(llm)
                llm.llm_engine.shutdown()
        logs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    return refs, [json.loads(out.read_text()) for out in outs]


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_greedy_tokens_equal_tp1(runs, case):
    refs, ranks = runs
    want = refs[case]
    for rank, results in enumerate(ranks):
        got = results[case]
        assert "error" not in got, f"rank {rank}: {got.get('error')}"
        for g, w in zip(got["outputs"], want, strict=True):
            assert g["tokens"] == w["tokens"], (rank, got["kernels"])
            # weight-only methods differ by summation order only; methods that quantize activations per token
            # do it on each rank's slice of a row-parallel layer's input (as vLLM does), so a little more
            tol = 5e-2 if case in ("ct-w8a8-int8", "fp8-at-load") else 1e-3
            torch.testing.assert_close(torch.tensor(g["logprobs"]), torch.tensor(w["logprobs"]), atol=tol,
                                       rtol=0)


# -- refusals: before any rank starts, naming the layer, the unit and the size ------------------------------------
def test_group_that_does_not_divide_a_ranks_inputs_is_refused(tmp_path, test_tokenizer):
    from llmctl import LLM

    base = make_tiny_model("llama", tmp_path / "base", test_tokenizer, hidden_size=128, intermediate_size=256)
    path, _ = write_gptq(base, tmp_path / "gptq", 4, 128, False)
    with pytest.raises(ValueError, match=r"tensor_parallel_size: 2 splits layer model\.layers\.0\.self_attn\.o_proj "
                                         r"by its 128 input columns, 64 per rank, which is not a multiple of the "
                                         r"gptq group_size=128"):
        LLM(str(path), tensor_parallel_size=2, distributed_executor_backend="external_launcher", num_threads=1)


def test_gguf_block_that_a_split_would_cut_is_refused(tmp_path, test_tokenizer):
    from llmctl import LLM

    types = {**GGUF_TP_TYPES, "1.ffn_down": "Q6_K"}  # 256-value super-blocks, 128 input columns per rank
    path = write_gguf(tmp_path / "tiny.gguf", test_tokenizer, types, hidden=256, ffn=256)
    with pytest.raises(ValueError, match=r"layer model\.layers\.1\.mlp\.down_proj by its 256 input columns, 128 per "
                                         r"rank, which is not a multiple of the gguf Q6_K block=256 .* or leave "
                                         r"quantization unset"):
        LLM(str(path), quantization="gguf", tensor_parallel_size=2, distributed_executor_backend="external_launcher",
            num_threads=1)


def test_layers_refuse_cutting_groups_and_packed_words_themselves():
    """The layers check again as they are built (for models the start-up check does not know)."""
    from llmctl.layers.parallel import MergedColumnParallelLinear, RowParallelLinear
    from llmctl.quantization.gptq_awq import GPTQLinear
    from llmctl.tensor_parallel import TensorParallelGroup

    tp = TensorParallelGroup(rank=1, size=2)
    row = RowParallelLinear(96, 64, bias=False, dtype=torch.float32, device=torch.device("cpu"), tp=tp)
    with pytest.raises(ValueError, match=r"splits layer x\.down by its 96 input columns, 48 per rank, which is "
                                         r"not a multiple of the gptq group_size=32"):
        row.set_quantizer(GPTQLinear("x.down", 4, 32, 1))
    col = MergedColumnParallelLinear(64, [8, 8], bias=False, dtype=torch.float32, device=torch.device("cpu"), tp=tp)
    with pytest.raises(ValueError, match=r"gives layer x\.gate_up 4 output rows per projection and rank, which is "
                                         r"not a multiple of the 8 values one gptq qzeros word packs"):
        col.set_quantizer(GPTQLinear("x.gate_up", 4, 32, 1))


def test_gguf_rank_reads_its_rows_and_blocks_from_the_map():
    """A rank's rows come out of the map in Hugging Face order (llama.cpp's q/k interleave undone) and its input
    columns as whole blocks, equal to the same part of the whole tensor."""
    import numpy as np

    from llmctl.loader.gguf_hf import LazyBlocks, _unpermute_rows

    blocks = np.arange(16 * 36, dtype=np.uint8).reshape(16, 36)
    blocks.setflags(write=False)
    lazy = LazyBlocks(blocks, n_head=2)
    whole = torch.from_numpy(_unpermute_rows(blocks, 2).copy())
    assert torch.equal(lazy.read(), whole)
    assert torch.equal(lazy.read_slice(0, 8, 8), whole[8:])
    assert torch.equal(lazy.read_slice(1, 18, 18), whole[:, 18:])
