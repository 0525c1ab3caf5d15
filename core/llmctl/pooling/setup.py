"""What the engine core decides once, at start-up, for the runner a checkpoint needs: the model class, the
attention features it asks of the backend, the pooler configuration, and the context limit."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.models.supported import attention_features
from llmctl.pooling.config import pooling_model_class, read_sentence_transformers_config, resolve_runner
from llmctl.pooling.pooler import PoolerConfig

# A bidirectional sequence is computed in one step from no cached context.
_BIDIRECTIONAL_EXCLUDES = frozenset({"chunked_prefill", "prefix_caching"})


@dataclass(frozen=True)
class RunnerPlan:
    runner: str  # "generate" | "pooling"
    model_cls: Any
    attention_features: frozenset[str] = field(default_factory=frozenset)
    pooler_config: PoolerConfig | None = None
    max_len_cap: int | None = None  # sentence-transformers' max_seq_length, or an encoder's position table

    @property
    def pooling(self) -> bool:
        return self.runner == "pooling"


def as_pooler_config(value: Any) -> PoolerConfig | None:
    if value is None or isinstance(value, PoolerConfig):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {"pooling_type", "normalize"}
        if unknown:
            raise ValueError(f"pooler_config: unknown key {sorted(unknown)[0]!r} (pooling_type, normalize)")
        pt = value.get("pooling_type")
        return PoolerConfig(pt.upper() if isinstance(pt, str) else pt, value.get("normalize"))
    raise ValueError(f"pooler_config: expected a dict with pooling_type/normalize, got {type(value).__name__}")


def plan_runner(requested: str, user_pooler_config: Any, hf_config: Any, model_dir: Path, registry: Any,
                get_model_class: Any) -> RunnerPlan:
    runner = resolve_runner(requested, hf_config, model_dir, registry)
    user_pc = as_pooler_config(user_pooler_config)
    if runner == "generate":
        cls = get_model_class(hf_config, registry)
        if getattr(cls, "is_pooling_model", False):
            archs = " / ".join(getattr(hf_config, "architectures", None) or [])
            raise ValueError(f"runner: architecture {archs} is a pooling model (embeddings, scores); start it with "
                             f"runner='pooling' (llmctl serve --runner pooling)")
        if user_pc is not None:
            raise ValueError("pooler_config: only applies with runner='pooling'")
        return RunnerPlan(runner, cls, attention_features(cls, hf_config))
    cls = pooling_model_class(hf_config, registry)
    st = read_sentence_transformers_config(model_dir)
    pc = st.pooler if st is not None else None
    if user_pc is not None:  # the user's fields win over the checkpoint's
        base = pc or PoolerConfig()
        pc = PoolerConfig(user_pc.pooling_type or base.pooling_type,
                          user_pc.normalize if user_pc.normalize is not None else base.normalize)
    caps = [c for c in (st.max_seq_length if st is not None else None,
                        getattr(cls, "max_context", lambda cfg: None)(hf_config)) if c]
    features = attention_features(cls, hf_config)
    return RunnerPlan(runner, cls, features, pc, min(caps) if caps else None)


def backend_features(base: frozenset[str], plan: RunnerPlan) -> frozenset[str]:
    """The features the attention backend must support: a bidirectional model drops the ones it never uses."""
    if "bidirectional" in plan.attention_features:
        base = base - _BIDIRECTIONAL_EXCLUDES
    return base | plan.attention_features
