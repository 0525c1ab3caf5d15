"""The checkpoint-to-fused-module copy shared by the decoder models and the EAGLE head.

Checkpoints store q/k/v and gate/up as separate tensors while the engine keeps them fused; one loop maps them
(and refuses unknown or missing tensors) so every model that fuses the same way fails the same way on a wrong
checkpoint instead of running with uninitialised memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from llmctl.layers._params import copy_checked
from llmctl.layers.linear import MergedLinear

# Checkpoint projection -> (fused module, shard index).
STACKED_QKV_GATE_UP: tuple[tuple[str, str, int], ...] = (
    (".q_proj.", ".qkv_proj.", 0),
    (".k_proj.", ".qkv_proj.", 1),
    (".v_proj.", ".qkv_proj.", 2),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)


def load_fused(weights: Iterable[tuple[str, torch.Tensor]], params: dict[str, nn.Parameter],
               modules: dict[str, nn.Module], stacked: tuple[tuple[str, str, int], ...],
               no_place: Callable[[str], str]) -> set[str]:
    """Copies each (already filtered and renamed) tensor into its parameter or fused shard; returns the loaded
    keys (``name`` or ``name#shard``) for :func:`missing_tensors`. ``no_place(name)`` words the refusal."""
    loaded: set[str] = set()
    for name, tensor in weights:
        for hf_part, fused_part, shard in stacked:
            if hf_part in name:
                target = name.replace(hf_part, fused_part)
                module = modules.get(target.rsplit(".", 1)[0])
                if target not in params or not isinstance(module, MergedLinear):
                    raise ValueError(no_place(name))
                module.load_shard(params[target], shard, tensor, name)
                loaded.add(f"{target}#{shard}")
                break
        else:
            if name not in params:
                raise ValueError(no_place(name))
            owner = modules.get(name.rsplit(".", 1)[0])
            load_param = getattr(owner, "load_param", None)  # a sharded layer takes its rank's slice itself
            if load_param is not None:
                load_param(params[name], tensor, name)
            else:
                copy_checked(params[name].data, tensor, name)
            loaded.add(name)
    return loaded


def missing_tensors(params: dict[str, nn.Parameter], modules: dict[str, nn.Module], loaded: set[str],
                    optional: Callable[[str], bool] = lambda _: False) -> list[str]:
    """Every parameter (every shard of a fused one) that ``loaded`` lacks, except the ``optional`` ones."""
    missing: list[str] = []
    for pname in params:
        module = modules[pname.rsplit(".", 1)[0]]
        if isinstance(module, MergedLinear):
            missing += [f"{pname}#{i}" for i in range(len(module.output_sizes)) if f"{pname}#{i}" not in loaded]
        elif pname not in loaded and not optional(pname):
            missing.append(pname)
    return missing
