"""BERT-style encoders for pooling: BERT, RoBERTa and XLM-RoBERTa, as embedding models and as cross-encoder /
sequence classifiers.

Post-LayerNorm transformer layers with bidirectional attention (``EncoderAttention``) over the paged KV cache;
absolute position embeddings (RoBERTa's are offset past its padding index) and token-type embeddings, which
carry the query/document split of a cross-encoder pair. Module names follow transformers' so checkpoints map
one to one, except that query/key/value are fused into one projection at load time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.attention import AttentionMetadata
from llmctl.layers import Linear, MergedLinear, VocabEmbedding
from llmctl.layers._module import EngineModule
from llmctl.layers._params import copy_checked, empty_param
from llmctl.layers.encoder_attention import BIDIRECTIONAL, EncoderAttention
from llmctl.models.base import KVCacheSpec, ModelContext
from llmctl.pooling.pooler import ClassifierPooler, EmbeddingPooler, PoolerConfig

_QKV = ((".attention.self.query.", 0), (".attention.self.key.", 1), (".attention.self.value.", 2))
_SKIPPED = ("embeddings.position_ids",)


def _activation(name: str):
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"model: hidden_act {name!r} is not supported")
    return ACT2FN[name]


def _position_offset(cfg: Any) -> int:
    """RoBERTa numbers positions from ``padding_idx + 1`` (its position table has those extra rows)."""
    return cfg.pad_token_id + 1 if cfg.model_type in ("roberta", "xlm-roberta") else 0


def encoder_max_len(cfg: Any) -> int:
    return cfg.max_position_embeddings - _position_offset(cfg)


class LayerNorm(EngineModule):
    def __init__(self, size: int, eps: float, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.size, self.eps = size, eps
        self.weight = empty_param(size, dtype=dtype, device=device)
        self.bias = empty_param(size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.size,), self.weight, self.bias, self.eps)


class _Dense(EngineModule):
    """transformers' ``dense`` + ``LayerNorm`` blocks: project, add the residual, normalise."""

    def __init__(self, d_in: int, d_out: int, eps: float, kw: dict) -> None:
        super().__init__()
        self.dense = Linear(d_in, d_out, bias=True, **kw)
        self.LayerNorm = LayerNorm(d_out, eps, **kw)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class _SelfAttention(EngineModule):
    def __init__(self, cfg: Any, ctx: ModelContext, kw: dict) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.num_heads
        size = self.num_heads * self.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, [size, size, size], bias=True, **kw)
        self.attn = EncoderAttention(self.num_heads, self.num_heads, self.head_dim, self.head_dim**-0.5,
                                     ctx.attention)

    def forward(self, hidden: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        shape = (hidden.shape[0], self.num_heads, self.head_dim)
        return self.attn(q.reshape(shape), k.reshape(shape), v.reshape(shape), kv_cache, metadata)


class _Attention(EngineModule):
    def __init__(self, cfg: Any, ctx: ModelContext, kw: dict) -> None:
        super().__init__()
        self.self = _SelfAttention(cfg, ctx, kw)  # transformers' name: attention.self.query
        self.output = _Dense(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps, kw)

    def forward(self, hidden: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        return self.output(self.self(hidden, kv_cache, metadata), hidden)


class _Intermediate(EngineModule):
    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, **kw)
        self.act = _activation(cfg.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class BertLayer(EngineModule):
    def __init__(self, cfg: Any, ctx: ModelContext, kw: dict) -> None:
        super().__init__()
        self.attention = _Attention(cfg, ctx, kw)
        self.intermediate = _Intermediate(cfg, kw)
        self.output = _Dense(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, kw)

    def forward(self, hidden: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        attn = self.attention(hidden, kv_cache, metadata)
        return self.output(self.intermediate(attn), attn)


class _Encoder(EngineModule):
    def __init__(self, cfg: Any, ctx: ModelContext, kw: dict) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg, ctx, kw) for _ in range(cfg.num_hidden_layers))


class BertEmbeddings(EngineModule):
    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__()
        self.word_embeddings = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position_embeddings = VocabEmbedding(cfg.max_position_embeddings, cfg.hidden_size, **kw)
        self.token_type_embeddings = VocabEmbedding(max(cfg.type_vocab_size, 1), cfg.hidden_size, **kw)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.position_offset = _position_offset(cfg)
        if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"model: position_embedding_type {cfg.position_embedding_type!r} is not supported "
                             f"(absolute is)")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions + self.position_offset)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class _BertPooler(EngineModule):
    """transformers' ``BertPooler``: dense + tanh of the first token, the input of BERT's classifier."""

    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size, bias=True, **kw)

    def forward(self, cls_rows: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_rows))


class BertEncoder(EngineModule):
    """transformers' ``BertModel`` (and ``RobertaModel``): embeddings, encoder layers, optional pooler."""

    def __init__(self, cfg: Any, ctx: ModelContext, with_pooler: bool) -> None:
        super().__init__()
        kw = dict(dtype=ctx.dtype, device=ctx.device)
        self.embeddings = BertEmbeddings(cfg, kw)
        self.encoder = _Encoder(cfg, ctx, kw)
        self.pooler = _BertPooler(cfg, kw) if with_pooler else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embeddings(input_ids, positions, token_type_ids)
        for layer, kv_cache in zip(self.encoder.layer, kv_caches, strict=True):
            hidden = layer(hidden, kv_cache, metadata)
        return hidden


class _EncoderModelBase(EngineModule):
    """What the engine calls on every encoder: forward, the KV geometry, and checked weight loading."""

    is_pooling_model = True
    attention_features = frozenset({BIDIRECTIONAL})
    encoder: BertEncoder  # set by subclasses under transformers' attribute name
    # Classifiers load checkpoint names as they are. An embedding model strips the prefix a BertModel saved
    # inside another model carries ("bert.", "roberta.") and adds its own module name ("encoder.").
    _strip_prefixes: tuple[str, ...] = ()
    _add_prefix = ""
    _optional_prefixes: tuple[str, ...] = ()  # tensors the checkpoint may carry that this model does not use

    @staticmethod
    def max_context(hf_config: Any) -> int:
        return encoder_max_len(hf_config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(input_ids, positions, kv_caches, metadata, token_type_ids)

    def kv_cache_spec(self) -> KVCacheSpec:
        attn = self.encoder.encoder.layer[0].attention.self
        return KVCacheSpec(num_layers=len(self.encoder.encoder.layer), num_kv_heads=attn.num_heads,
                           head_size=attn.head_dim)

    def _target(self, name: str) -> str:
        """The parameter a checkpoint tensor loads into (old checkpoints name LayerNorm's weights gamma/beta)."""
        for prefix in self._strip_prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        return self._add_prefix + name

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for raw_name, tensor in weights:
            if raw_name.endswith(_SKIPPED):
                continue
            name = self._target(raw_name)
            for part, shard in _QKV:
                if part in name:
                    target = name.replace(part, ".attention.self.qkv_proj.")
                    module = modules.get(target.rsplit(".", 1)[0])
                    if target not in params or not isinstance(module, MergedLinear):
                        raise ValueError(f"checkpoint tensor {raw_name} has no place in {type(self).__name__}")
                    module.load_shard(params[target], shard, tensor, raw_name)
                    loaded.add(f"{target}#{shard}")
                    break
            else:
                if name not in params:
                    if name.startswith(self._optional_prefixes):
                        continue
                    raise ValueError(f"checkpoint tensor {raw_name} has no place in {type(self).__name__}")
                copy_checked(params[name].data, tensor, raw_name)
                loaded.add(name)
        missing = []
        for pname in params:
            module = modules[pname.rsplit(".", 1)[0]]
            if isinstance(module, MergedLinear):
                missing += [f"{pname}#{i}" for i in range(3) if f"{pname}#{i}" not in loaded]
            elif pname not in loaded:
                missing.append(pname)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:5])}")


class BertEmbeddingModel(_EncoderModelBase):
    """``BertModel`` / ``RobertaModel`` / ``XLMRobertaModel`` checkpoints as embedding models (sentence-
    transformers' all-MiniLM, bge, e5...). Pooling defaults to CLS + normalise, as in vLLM; a sentence-transformers
    checkpoint's own Pooling/Normalize modules override that."""

    _strip_prefixes = ("bert.", "roberta.", "model.")
    _add_prefix = "encoder."
    _optional_prefixes = ("encoder.pooler.", "encoder.lm_head.", "encoder.cls.")

    def __init__(self, hf_config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.config = hf_config
        self.encoder = BertEncoder(hf_config, ctx, with_pooler=False)
        pc: PoolerConfig = ctx.extra.get("pooler_config") or PoolerConfig()
        self.pooler = EmbeddingPooler(pc.pooling_type or "CLS", True if pc.normalize is None else pc.normalize)


class BertForSequenceClassification(_EncoderModelBase):
    """Cross-encoder rerankers and classifiers: CLS token -> BertPooler (dense + tanh) -> classifier."""

    def __init__(self, hf_config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.config = hf_config
        kw = dict(dtype=ctx.dtype, device=ctx.device)
        self.bert = BertEncoder(hf_config, ctx, with_pooler=True)
        self.classifier = Linear(hf_config.hidden_size, hf_config.num_labels, bias=True, **kw)
        self.pooler = ClassifierPooler("CLS", self._head, hf_config.num_labels)

    @property
    def encoder(self) -> BertEncoder:  # type: ignore[override]
        return self.bert

    def _head(self, cls_rows: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bert.pooler(cls_rows))


class _RobertaClassificationHead(EngineModule):
    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size, bias=True, **kw)
        self.out_proj = Linear(cfg.hidden_size, cfg.num_labels, bias=True, **kw)

    def forward(self, cls_rows: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(cls_rows)))


class RobertaForSequenceClassification(_EncoderModelBase):
    """RoBERTa / XLM-R cross-encoders (bge-reranker and kin): CLS token -> dense + tanh -> out_proj."""

    def __init__(self, hf_config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.config = hf_config
        kw = dict(dtype=ctx.dtype, device=ctx.device)
        self.roberta = BertEncoder(hf_config, ctx, with_pooler=False)
        self.classifier = _RobertaClassificationHead(hf_config, kw)
        self.pooler = ClassifierPooler("CLS", self.classifier, hf_config.num_labels)

    @property
    def encoder(self) -> BertEncoder:  # type: ignore[override]
        return self.roberta


ARCHITECTURES: dict[str, type] = {
    "BertModel": BertEmbeddingModel,
    "RobertaModel": BertEmbeddingModel,
    "XLMRobertaModel": BertEmbeddingModel,
    "BertForSequenceClassification": BertForSequenceClassification,
    "RobertaForSequenceClassification": RobertaForSequenceClassification,
    "XLMRobertaForSequenceClassification": RobertaForSequenceClassification,
}
