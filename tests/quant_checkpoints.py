"""Quantized test checkpoints written with the formats' own tools (compressed-tensors' compressors, gguf's
writer and quantizers) or packed here after the published layouts (GPTQ, AWQ), each with the dense weights it
stands for, so a test can run transformers on exactly those weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Llama's projections, Phi-3's fused ones and BLOOM's (quantized as one layer each, as GPTQ and AWQ tools do), and
# DeepSeek's latent-attention ones
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                   "gate_up_proj", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "q_a_proj",
                   "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")


def _linear_names(state: dict[str, torch.Tensor]) -> list[str]:
    """The projections quantization tools cover: Llama-style ones and Mixtral's experts (``experts.{e}.w1``); a
    MoE router (``mlp.gate``, ``block_sparse_moe.gate``) and Qwen2-MoE's ``shared_expert_gate`` stay dense."""
    return [k[: -len(".weight")] for k in state if k.endswith(".weight") and (
        k.split(".")[-2] in LINEAR_SUFFIXES or (".experts." in k and k.split(".")[-2] in ("w1", "w2", "w3")))]


def _load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _save(out: Path, base: Path, state: dict[str, torch.Tensor], qc: dict | None) -> Path:
    import shutil

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    if qc is not None:
        cfg = json.loads((out / "config.json").read_text())
        cfg["quantization_config"] = qc
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def _calibrate(model, ids: list[int] | None = None) -> dict[str, float]:
    """The largest |input| each linear layer sees on a short calibration text (for static activation scales)."""
    amax: dict[str, float] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: amax.__setitem__(
        name, max(amax.get(name, 0.0), float(args[0].abs().max()))))
        for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(torch.tensor([ids or list(range(1, 400, 7))]))
    for h in hooks:
        h.remove()
    return amax


# -- compressed-tensors ----------------------------------------------------------------------------------------
def write_compressed_tensors(base: Path, out: Path, preset: str, **weight_args) -> tuple[Any, ...]:
    """Quantize ``base`` with a compressed-tensors preset scheme (min/max weight observers, as llm-compressor's
    default), compress it with the library's compressors and save it; returns the directory, the dense weights
    the library's own decompressor gives back (the oracle), the scheme's activation args and static input scales."""
    import transformers as tf
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    model = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    amax = _calibrate(model)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    for key, value in weight_args.items():
        setattr(scheme.weights, key, value)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    apply_quantization_config(model, config)
    for name, m in model.named_modules():
        if getattr(m, "quantization_scheme", None) is None:
            continue
        args, w = m.quantization_scheme.weights, m.weight.data
        if args.strategy == "group":
            wg = w.view(w.shape[0], -1, args.group_size)
            lo, hi = wg.amin(-1), wg.amax(-1)
        elif args.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        else:
            lo, hi = w.min(), w.max()
        scale, zp = calculate_qparams(lo, hi, args)
        m.weight_scale.data = scale.to(m.weight_scale.dtype).reshape(m.weight_scale.shape)
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data = zp.to(m.weight_zero_point.dtype).reshape(m.weight_zero_point.shape)
        if hasattr(m, "input_scale"):
            m.input_scale.data.fill_(amax[name] / 448.0)  # static fp8: the calibration run's range
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    import shutil

    for f in base.iterdir():  # the tokenizer
        if not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    fmt = qc["config_groups"]["group_0"].get("format") or qc["format"]
    state = _load_state(out)
    dense, input_scales = {}, {}
    for prefix in {k.rsplit(".", 1)[0] for k in state if k.endswith("weight_scale")}:
        local = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == prefix}
        dense[prefix] = BaseCompressor.load_from_registry(fmt).decompress(local, scheme)["weight"].float()
        if "input_scale" in local:
            input_scales[prefix] = local["input_scale"]
    return out, dense, scheme.input_activations, input_scales


def write_compressed_tensors_state(base: Path, out: Path, preset: str, **weight_args) -> tuple[Any, ...]:
    """As :func:`write_compressed_tensors`, for checkpoints whose experts transformers holds as 3D tensors (so
    ``apply_quantization_config`` never sees them): every projection of the saved state (routed experts
    included, routers not) quantized with min/max scales and compressed by the library's own compressor, with
    the ignore list llm-compressor's MoE recipes use. Returns the directory, the dense weights the library's
    decompressor gives back, and the scheme's activation args (dynamic schemes only)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    state = _load_state(base)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    for key, value in weight_args.items():
        setattr(scheme.weights, key, value)
    args = scheme.weights
    fmt = "pack-quantized" if args.type == "int" and scheme.input_activations is None else \
        "int-quantized" if args.type == "int" else "float-quantized"
    compressor = BaseCompressor.load_from_registry(fmt)
    dense = {}
    for prefix in _linear_names(state):
        w = state.pop(prefix + ".weight").float()
        if args.strategy == "group":
            wg = w.view(w.shape[0], -1, args.group_size)
            lo, hi = wg.amin(-1), wg.amax(-1)
        elif args.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        else:
            lo, hi = w.min().reshape(1), w.max().reshape(1)
        scale, zp = calculate_qparams(lo, hi, args)
        local = {"weight": w, "weight_scale": scale.float(), "weight_zero_point": zp}
        packed = compressor.compress(local, scheme)
        dense[prefix] = compressor.decompress(dict(packed), scheme)["weight"].float()
        state.update({f"{prefix}.{k}": v for k, v in packed.items()})
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt,
                                quantization_status=QuantizationStatus.COMPRESSED,
                                ignore=["lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate$",
                                        "re:.*shared_expert_gate$"])
    qc = config.model_dump(mode="json")
    qc["quant_method"] = "compressed-tensors"
    return _save(out, base, state, qc), dense, scheme.input_activations


def dense_checkpoint(base: Path, out: Path, dense: dict[str, torch.Tensor]) -> Path:
    """``base`` with the given projections' weights (checkpoint prefixes): what transformers loads as the oracle of
    a checkpoint whose experts it holds as 3D tensors."""
    state = _load_state(base)
    for prefix, w in dense.items():
        state[prefix + ".weight"] = w.to(state[prefix + ".weight"].dtype)
    return _save(out, base, state, None)


def fake_quantize_experts(model, act_args) -> None:
    """Each routed expert's inputs fake-quantized per token, as a W8A8 kernel quantizes them (transformers'
    fused-experts loop, with the quantization before each of the two matmuls)."""
    import torch.nn.functional as F

    for module in model.modules():
        if not isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter):
            continue

        def forward(hidden, top_k_index, top_k_weights, m=module):
            out = torch.zeros_like(hidden)
            for e in torch.unique(top_k_index).tolist():
                token, pos = torch.where(top_k_index == e)
                gate, up = F.linear(_fake_quant(hidden[token], act_args), m.gate_up_proj[e]).chunk(2, dim=-1)
                h = F.linear(_fake_quant(m.act_fn(gate) * up, act_args), m.down_proj[e])
                out.index_add_(0, token, (h * top_k_weights[token, pos, None]).to(out.dtype))
            return out

        module.forward = forward


def _fake_quant(x, args):
    """Dynamic per-token fake quantization by compressed-tensors (scale amax / 127 for int8: vLLM's rule)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    x3 = x.reshape(1, -1, x.shape[-1])  # [1, tokens, width]: the token strategy keeps dims 0 and 1 (a 2D input
    # would be quantized per element)
    scale, zp = compute_dynamic_scales_and_zp(x3, args, None)
    if args.type == "int":
        scale = x3.abs().amax(-1, keepdim=True) / 127.0
    return fake_quantize(x3, scale, zp, args).reshape(x.shape)


# -- GPTQ / AWQ, packed here after the published layouts -----------------------------------------------------------
def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's qweight packing: ``32 // bits`` consecutive rows into one int32 row, row i at bits ``bits*i``
    (the column packing of the transpose)."""
    return _pack_cols(values.t(), bits).t().contiguous()


def _pack_cols(values: torch.Tensor, bits: int, order: list[int] | None = None) -> torch.Tensor:
    """Columns into int32 words; slot i of each word holds column ``order[i]`` of its group (AWQ's GEMM order)."""
    per = 32 // bits
    order = order or list(range(per))
    v = values.to(torch.int64)
    out = torch.zeros(v.shape[0], v.shape[1] // per, dtype=torch.int64)
    for i in range(per):
        out |= v[:, order[i]::per] << (bits * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def _quantize_groups(w: torch.Tensor, g_idx: torch.Tensor, groups: int, bits: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization per (row, group): (q [N, K], scales fp16 [G, N], zeros [G, N])."""
    qmax = (1 << bits) - 1
    n = w.shape[0]
    scales = torch.empty(groups, n)
    zeros = torch.empty(groups, n, dtype=torch.int64)
    for gi in range(groups):
        cols = w[:, g_idx == gi]
        lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        s = ((hi - lo) / qmax).clamp(min=1e-6).half().float()
        scales[gi], zeros[gi] = s, torch.round(-lo / s).clamp(0, qmax).long()
    s_k, z_k = scales[g_idx].t(), zeros[g_idx].t()  # [N, K]
    q = torch.clamp(torch.round(w / s_k) + z_k, 0, qmax).long()
    return q, scales.half(), zeros


def write_gptq(base: Path, out: Path, bits: int, group: int, act_order: bool, seed: int = 0
               ) -> tuple[Path, dict[str, torch.Tensor]]:
    state = _load_state(base)
    dense = {}
    for prefix in _linear_names(state):
        w = state.pop(prefix + ".weight").float()
        n, k = w.shape
        groups = k // group
        g_idx = torch.arange(k) // group
        if act_order:
            # GPTQ orders columns by the input's Hessian, which projections of the same input share (q/k/v,
            # gate/up); layer 1's v_proj gets an order of its own, as a checkpoint may have.
            key = prefix.rsplit(".", 1)[0] + ("" if prefix != "model.layers.1.self_attn.v_proj" else ".v")
            seed_gen = torch.Generator().manual_seed(seed + sum(map(ord, key)))
            g_idx = g_idx[torch.argsort(torch.rand(k, generator=seed_gen))]
        q, scales, zeros = _quantize_groups(w, g_idx, groups, bits)
        dense[prefix] = scales.float()[g_idx].t() * (q - zeros[g_idx].t())
        state[prefix + ".qweight"] = _pack_rows(q.t(), bits)
        state[prefix + ".qzeros"] = _pack_cols(zeros - 1, bits)  # the original GPTQ format stores zero - 1
        state[prefix + ".scales"] = scales
        state[prefix + ".g_idx"] = g_idx.to(torch.int32)
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order, "sym": False,
          "checkpoint_format": "gptq"}
    return _save(out, base, state, qc), dense


def write_awq(base: Path, out: Path, group: int) -> tuple[Path, dict[str, torch.Tensor]]:
    state = _load_state(base)
    dense = {}
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    for prefix in _linear_names(state):
        w = state.pop(prefix + ".weight").float()
        k = w.shape[1]
        g_idx = torch.arange(k) // group
        q, scales, zeros = _quantize_groups(w, g_idx, k // group, 4)
        dense[prefix] = scales.float()[g_idx].t() * (q - zeros[g_idx].t())
        state[prefix + ".qweight"] = _pack_cols(q.t(), 4, order)
        state[prefix + ".qzeros"] = _pack_cols(zeros, 4, order)
        state[prefix + ".scales"] = scales
    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    return _save(out, base, state, qc), dense


def activation_args(kind: str):
    """compressed-tensors' own description of dynamic per-token activation quantization (int8 or fp8)."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="int" if kind == "int8" else "float", strategy="token",
                            symmetric=True, dynamic=True)


def hf_model_with(base: Path, dense: dict[str, torch.Tensor], act_args=None,
                  input_scales: dict[str, torch.Tensor] | None = None):
    """transformers' model of ``base`` with the given linear weights (float32); with ``act_args`` the inputs of
    those layers are fake-quantized first by compressed-tensors (static ``input_scales``, or dynamic scales)."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    for prefix, w in dense.items():
        module = model.get_submodule(prefix)
        module.weight.data = w.to(torch.float32).clone()
        if act_args is not None:
            module.forward = _fake_quant_forward(module, act_args, (input_scales or {}).get(prefix))
    return model


def _fake_quant_forward(module, args, static_scale):
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    plain = module.forward

    def forward(x):
        if static_scale is not None:
            scale, zp = static_scale, torch.zeros_like(static_scale)
        else:
            scale, zp = compute_dynamic_scales_and_zp(x, args, module)
            if args.type == "int":
                # vLLM's dynamic int8 rule (and llmctl's): amax / 127, where compressed-tensors' own observer
                # takes amax / 127.5
                scale = x.abs().amax(-1, keepdim=True) / 127.0
        return plain(fake_quantize(x, scale, zp, args))

    return forward


# -- GGUF ------------------------------------------------------------------------------------------------------------
def write_gguf(path: Path, tok, types: dict[str, str], hidden: int = 256, ffn: int = 256, layers: int = 2,
               seed: int = 0, embed_type: str = "F16") -> Path:
    """A llama GGUF whose projection ``blk.{i}.{name}`` has ggml type ``types[f"{i}.{name}"]`` (F32 where not
    given); gguf's quantizer where it has one, random blocks with sane scales for K-quants. ``embed_type`` "Q8_0"
stores the token embedding (tied to the output, as SmolLM2's file does) in Q8_0 blocks. The tokenizer goes
    next to it (``tokenizer_config.json`` makes loaders take it from there)."""
    import gguf

    from tests.test_quantization_formats import gguf_blocks

    rng = np.random.default_rng(seed)
    heads, kv_heads = 4, 2
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    vocab = len(tok)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_bos_token_id(tok.bos_token_id or 0)
    w.add_eos_token_id(tok.eos_token_id or 0)

    def plain(name: str, *shape: int, scale: float = 1.0) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    embed = rng.standard_normal((vocab, hidden))
    if embed_type == "Q8_0":
        q8 = gguf.GGMLQuantizationType.Q8_0
        w.add_tensor("token_embd.weight", gguf.quants.quantize(embed.astype(np.float32), q8), raw_dtype=q8)
    else:
        w.add_tensor("token_embd.weight", embed.astype(np.float16))
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv_heads * head_dim, hidden),
              "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden),
              "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
    for i in range(layers):
        plain(f"blk.{i}.attn_norm.weight", hidden)
        plain(f"blk.{i}.ffn_norm.weight", hidden)
        for name, (n, k) in shapes.items():
            t = types.get(f"{i}.{name}", "F32")
            if t == "F32":
                plain(f"blk.{i}.{name}.weight", n, k, scale=0.1)
            else:
                blocks = gguf_blocks(t, n, k, seed=seed + 7 * i + len(name))
                if t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
                    blocks = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.1,
                                                  gguf.GGMLQuantizationType[t])
                w.add_tensor(f"blk.{i}.{name}.weight", blocks,
                             raw_dtype=gguf.GGMLQuantizationType[t])
    plain("output_norm.weight", hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok.save_pretrained(path.parent)
    return path


def write_family_gguf(family_dir: Path, out: Path, arch: str, types: dict[str, str]) -> Path:
    """A GGUF of another architecture (``arch``, llama.cpp's name) from a tiny Hugging Face checkpoint, written the
    way llama.cpp's converter names things: tensor names from gguf's own name table for ``arch``, metadata keys
    from transformers' GGUF config table read backwards, Gemma's norms stored with their +1 (transformers takes it
    off again). ``types``: llama.cpp projection name (``attn_q``, ``ffn_down``, ...) -> block type, quantized by
    gguf's quantizer; everything else float32. Transformers reading the file back is the oracle."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    cfg = AutoConfig.from_pretrained(family_dir)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    for key, attr in GGUF_CONFIG_MAPPING[arch].items():
        value = getattr(cfg, attr, None) if isinstance(attr, str) else None
        if isinstance(value, bool):
            w.add_bool(f"{arch}.{key}", value)
        elif isinstance(value, int):
            w.add_uint32(f"{arch}.{key}", value)
        elif isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
    if f"{arch}.vocab_size" not in w.kv_data[0]:
        w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    # no token list: the tokenizer lies beside the file, and parsing 49k tokens costs transformers seconds a read
    for hf_name, tensor in load_file(str(family_dir / "model.safetensors")).items():
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise ValueError(f"{arch}: no llama.cpp name for {hf_name}")
        a = tensor.float().numpy()
        if arch.startswith("gemma") and "norm" in base:
            a = a + 1.0
        qtype = types.get(gguf_name.rsplit(".", 1)[-1]) if a.ndim == 2 and suffix == "weight" else None
        if qtype is not None:
            q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(f"{gguf_name}.{suffix}", gguf.quants.quantize(a, q), raw_dtype=q)
        else:
            w.add_tensor(f"{gguf_name}.{suffix}", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for f in family_dir.iterdir():  # the tokenizer beside the file (tokenizer_config.json: loaders take it there)
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, out / f.name)
    return path
