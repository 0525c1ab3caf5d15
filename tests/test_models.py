"""Native Llama-family models against Hugging Face transformers, through a real paged KV cache.

Every comparison runs the same token ids through transformers' own implementation (float32) and checks our
logits position by position: a full prefill, a chunked prefill followed by token-by-token decode, and a mixed
batch where one sequence decodes while another prefills its second chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from llmctl.attention import AttentionMetadata
from llmctl.layers.rotary import get_rope
from llmctl.loader import iter_weights, load_model, load_tokenizer, resolve_model
from llmctl.models import native_architectures
from llmctl.models.base import ModelContext
from llmctl.ops import Ops
from llmctl.plugins.reference_attention import TorchReferenceAttention
from llmctl.plugins.registry import Registry

from tests.conftest import TINY_KINDS

BLOCK_SIZE = 16
NUM_BLOCKS = 24
ATOL = 1e-4
KINDS = (*TINY_KINDS, "llama_tied")


def make_ctx() -> ModelContext:
    return ModelContext(ops=Ops.reference(), attention=TorchReferenceAttention(), dtype=torch.float32,
                        device=torch.device("cpu"))


def make_registry() -> Registry:
    reg = Registry()
    for arch in native_architectures():
        reg.add_model(arch, "llmctl")
    return reg


@dataclass
class Seq:
    """One sequence's token ids and the cache blocks handed to it (deliberately not contiguous)."""

    tokens: list[int]
    blocks: list[int]
    cached: int = 0  # tokens already written to the cache


@dataclass
class PagedRunner:
    model: torch.nn.Module
    kv_caches: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        spec = self.model.kv_cache_spec()
        attn = self.model.ctx.attention
        shape = attn.kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE, spec.num_kv_heads, spec.head_size)
        self.kv_caches = [torch.zeros(shape) for _ in range(spec.num_layers)]

    @torch.no_grad()
    def step(self, work: list[tuple[Seq, int]]) -> list[torch.Tensor]:
        """Run ``n`` new tokens of each sequence in one flattened batch; returns each sequence's logits rows."""
        ids, pos, slots, qsl, seq_lens = [], [], [], [0], []
        for seq, n in work:
            for p in range(seq.cached, seq.cached + n):
                ids.append(seq.tokens[p])
                pos.append(p)
                slots.append(seq.blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
            qsl.append(qsl[-1] + n)
            seq_lens.append(seq.cached + n)
        width = max(len(s.blocks) for s, _ in work)
        tables = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s, _ in work], dtype=torch.int32)
        query_lens = [n for _, n in work]
        md = AttentionMetadata(
            num_tokens=len(ids), num_seqs=len(work), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
            slot_mapping=torch.tensor(slots, dtype=torch.int64), max_query_len=max(query_lens),
            max_seq_len=max(seq_lens), block_size=BLOCK_SIZE, query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
        hidden = self.model(torch.tensor(ids), torch.tensor(pos), self.kv_caches, md)
        logits = self.model.compute_logits(hidden).float()
        for seq, n in work:
            seq.cached += n
        return list(logits.split(query_lens))


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    """kind -> (our model, the transformers model), both float32 on CPU."""
    from transformers import AutoModelForCausalLM

    reg = make_registry()
    out = {}
    for kind in KINDS:
        path = str(tiny_model_dirs[kind])
        ours = load_model(resolve_model(path), make_ctx(), reg)
        theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        out[kind] = (ours, theirs)
    return out


def prompt(vocab: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_then_decode_matches_hf(models, kind):
    ours, theirs = models[kind]
    tokens = prompt(ours.config.vocab_size, 40, seed=7)
    ref = hf_logits(theirs, tokens)

    full = PagedRunner(ours).step([(Seq(tokens, [5, 2, 9]), 40)])[0]
    torch.testing.assert_close(full, ref, atol=ATOL, rtol=0)

    runner = PagedRunner(ours)
    seq = Seq(tokens, [11, 3, 7])
    got = [runner.step([(seq, 24)])[0]]
    got += [runner.step([(seq, 1)])[0] for _ in range(16)]
    torch.testing.assert_close(torch.cat(got), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_matches_hf(models, kind):
    """A decode and a second prefill chunk share one step; each must equal its own transformers run."""
    ours, theirs = models[kind]
    a_tokens = prompt(ours.config.vocab_size, 27, seed=1)
    b_tokens = prompt(ours.config.vocab_size, 40, seed=2)
    runner = PagedRunner(ours)
    a, b = Seq(a_tokens, [4, 1]), Seq(b_tokens, [0, 8, 6])
    runner.step([(a, 26)])
    runner.step([(b, 13)])
    a_logits, b_logits = runner.step([(a, 1), (b, 27)])
    torch.testing.assert_close(a_logits, hf_logits(theirs, a_tokens)[26:], atol=ATOL, rtol=0)
    torch.testing.assert_close(b_logits, hf_logits(theirs, b_tokens)[13:], atol=ATOL, rtol=0)


def test_kv_cache_spec_follows_config(models):
    mistral = models["mistral"][0].kv_cache_spec()
    assert (mistral.num_layers, mistral.num_kv_heads, mistral.head_size, mistral.sliding_window) == (2, 2, 16, 16)
    qwen3 = models["qwen3"][0].kv_cache_spec()
    assert (qwen3.head_size, qwen3.sliding_window) == (32, None)


def test_tied_embeddings_share_storage(models):
    tied, untied = models["llama_tied"][0], models["llama"][0]
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("rope", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
])
def test_rope_scaling_matches_hf(rope):
    """Our cos|sin table against transformers' rotary module at the same positions (incl. the attention
    scaling that yarn folds into cos and sin)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    kw = dict(hidden_size=64, num_attention_heads=2, max_position_embeddings=512, rope_theta=5000.0)
    if rope is not None:
        kw["rope_scaling"] = rope
    cfg = LlamaConfig(**kw)
    ours = get_rope(cfg, 32, Ops.reference(), torch.device("cpu"))
    positions = torch.tensor([0, 1, 7, 100, 511])
    cos, sin = LlamaRotaryEmbedding(LlamaConfig(**kw))(torch.zeros(1, dtype=torch.float32), positions[None])
    table = ours.cos_sin_cache[positions]
    torch.testing.assert_close(table[:, :16], cos[0, :, :16], atol=1e-6, rtol=0)
    torch.testing.assert_close(table[:, 16:], sin[0, :, :16], atol=1e-6, rtol=0)


def test_load_rejects_incomplete_checkpoint(tiny_model_dirs):
    from llmctl.models.llama import LlamaForCausalLM

    source = resolve_model(str(tiny_model_dirs["llama"]))
    model = LlamaForCausalLM(source.hf_config, make_ctx())
    weights = [(n, t) for n, t in iter_weights(source) if "layers.1.self_attn.v_proj" not in n]
    with pytest.raises(ValueError, match=r"missing .*layers\.1\.self_attn\.qkv_proj"):
        model.load_weights(weights)
    with pytest.raises(ValueError, match="no place"):
        model.load_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, smollm2_hf_fp32):
    source = resolve_model(str(smollm2_gguf))
    ours = load_model(source, make_ctx(), make_registry())
    return source, ours, smollm2_hf_fp32


def test_smollm2_gguf_matches_hf(smollm2):
    source, ours, theirs = smollm2
    tok = load_tokenizer(source)
    assert tok.chat_template, "the GGUF's chat template must come with the tokenizer"
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    tokens = tok(text, add_special_tokens=False)["input_ids"]
    ref = hf_logits(theirs, tokens)
    runner = PagedRunner(ours)
    seq = Seq(tokens, list(range(NUM_BLOCKS - 1, NUM_BLOCKS - 1 - (len(tokens) + 4) // BLOCK_SIZE - 1, -1)))
    got = [runner.step([(seq, len(tokens) - 3)])[0]]
    got += [runner.step([(seq, 1)])[0] for _ in range(3)]
    torch.testing.assert_close(torch.cat(got), ref, atol=1e-3, rtol=1e-4)
    assert torch.equal(torch.cat(got).argmax(-1), ref.argmax(-1))


def _bfloat16_errors(ours, path: str, hf32) -> tuple[torch.Tensor, float, float]:
    """A 40-token prompt through our bfloat16 model (on a bfloat16 paged cache): its logits, and the largest
    distance from the float32 transformers logits of ours and of transformers' own bfloat16 run."""
    from transformers import AutoModelForCausalLM

    hf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    tokens = prompt(ours.config.vocab_size, 40, seed=3)
    ref = hf_logits(hf32, tokens)
    runner = PagedRunner(ours)
    runner.kv_caches = [c.to(torch.bfloat16) for c in runner.kv_caches]
    got = runner.step([(Seq(tokens, [2, 0, 1]), 40)])[0]
    return got, float((got - ref).abs().max()), float((hf_logits(hf16, tokens) - ref).abs().max())


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_bfloat16_error_is_like_transformers_own(tiny_model_dirs, models, kind):
    """In bfloat16 we cannot match bit for bit; our distance from the float32 reference must stay within
    twice the distance of transformers' own bfloat16 run."""
    path = str(tiny_model_dirs[kind])
    ctx = make_ctx()
    ctx.dtype = torch.bfloat16
    ours = load_model(resolve_model(path), ctx, make_registry())
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.model.layers[0].self_attn.rotary_emb.cos_sin_cache.dtype == torch.float32
    got, ours_err, hf_err = _bfloat16_errors(ours, path, models[kind][1])
    assert got.dtype == torch.float32
    assert ours_err <= 2 * hf_err


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_bfloat16_on_the_cpu_platform_ops_is_like_transformers_own(tiny_model_dirs, models, kind):
    """The same bound with the CPU plugin's ops (C GEMMs, RMSNorm, SiLU fused into the gate/up GEMM where the host
    has them), and the fused MLP path really bound: its plain gate/up weight released, the layer unusable alone."""
    from llmctl.plugins import PluginManager

    path = str(tiny_model_dirs[kind])
    ops = PluginManager().load().registry.resolve_ops("cpu")
    ctx = ModelContext(ops=ops, attention=TorchReferenceAttention(), dtype=torch.bfloat16, device=torch.device("cpu"))
    ours = load_model(resolve_model(path), ctx, make_registry())
    mlp = ours.model.layers[0].mlp
    fused = ops.pack_gated_linear_weight(torch.zeros(128, 64, dtype=torch.bfloat16)) is not None
    assert (mlp._gated is not None) == fused
    if fused:
        assert mlp.gate_up_proj.weight.numel() == 0
        with pytest.raises(RuntimeError, match="fused op"):
            mlp.gate_up_proj(torch.zeros(1, 64, dtype=torch.bfloat16))
    _, ours_err, hf_err = _bfloat16_errors(ours, path, models[kind][1])
    assert ours_err <= 2 * hf_err


def test_qwen2_per_layer_sliding_window(tmp_path, test_tokenizer):
    """``use_sliding_window`` with ``max_window_layers=1``: layer 0 attends fully, layer 1 within the window,
    so the cache spec must report no model-wide window."""
    from transformers import AutoModelForCausalLM

    from tests.model_factory import make_tiny_model

    path = str(make_tiny_model("qwen2", tmp_path / "qwen2-swa", test_tokenizer, use_sliding_window=True,
                               sliding_window=16, max_window_layers=1))
    ours = load_model(resolve_model(path), make_ctx(), make_registry())
    assert [layer.self_attn.attn.sliding_window for layer in ours.model.layers] == [None, 16]
    assert ours.kv_cache_spec().sliding_window is None
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = prompt(ours.config.vocab_size, 40, seed=5)
    got = PagedRunner(ours).step([(Seq(tokens, [3, 1, 2]), 40)])[0]
    torch.testing.assert_close(got, hf_logits(theirs, tokens), atol=ATOL, rtol=0)
