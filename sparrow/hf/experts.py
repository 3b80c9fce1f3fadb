"""The experts of a mixture-of-experts layer on disk. Sparrow (like transformers 5 in memory) holds them as 3-D
tensors ``mlp.experts.gate_up_proj`` (E, 2I, H) and ``mlp.experts.down_proj`` (E, H, I), while checkpoints (those
transformers 5 writes too) hold one matrix per expert: Mixtral's ``block_sparse_moe.experts.{e}.w1/w3/w2``
(gate/up/down) and Qwen3-MoE's ``mlp.experts.{e}.gate_proj/up_proj/down_proj``. :func:`experts_from_hf` and
:func:`experts_to_hf` convert; every other weight name is already transformers' own. Files are read and written by
:mod:`sparrow.safetensors_io`.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor


# Per-expert checkpoint names: model_type -> (prefix of the MoE block, names of gate, up and down).
_EXPERT_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
                 "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+)\.(\w+)\.experts\.(\d+)\.(\w+)\.weight$")


def experts_from_hf(state: dict[str, Tensor], model_type: str) -> dict[str, Tensor]:
    """Stack a checkpoint's per-expert matrices into Sparrow's 3-D expert tensors (and move Mixtral's router
    ``block_sparse_moe.gate`` to ``mlp.gate``); other keys pass through."""
    if model_type not in _EXPERT_NAMES:
        return state
    block, (gate, up, down) = _EXPERT_NAMES[model_type]
    out: dict[str, Tensor] = {}
    per_layer: dict[str, dict[str, dict[int, Tensor]]] = {}
    for key, value in state.items():
        match = _EXPERT_KEY.match(key)
        if match and match.group(2) == block and match.group(4) in (gate, up, down):
            layer, _, expert, name = match.groups()
            per_layer.setdefault(layer, {}).setdefault(name, {})[int(expert)] = value
        else:
            out[key.replace(f".{block}.gate.", ".mlp.gate.")] = value
    for layer, mats in per_layer.items():
        experts = sorted(mats.get(gate, {}))
        for name in (gate, up, down):
            if sorted(mats.get(name, {})) != list(range(len(experts))):
                raise ValueError(f"{layer}.{block}.experts: {name} weights of experts {sorted(mats.get(name, {}))}, "
                                 f"expected 0..{len(experts) - 1}")
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([mats[gate][e], mats[up][e]]) for e in experts])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([mats[down][e] for e in experts])
    return out


def experts_to_hf(state: dict[str, Tensor], model_type: str) -> dict[str, Tensor]:
    """The inverse of :func:`experts_from_hf`: one matrix per expert, under ``model_type``'s names."""
    if model_type not in _EXPERT_NAMES:
        return state
    block, (gate, up, down) = _EXPERT_NAMES[model_type]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith(".mlp.experts.gate_up_proj"):
            prefix = key[: -len(".mlp.experts.gate_up_proj")] + f".{block}.experts"
            gates, ups = value.chunk(2, dim=1)
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.{gate}.weight"] = gates[e].contiguous()
                out[f"{prefix}.{e}.{up}.weight"] = ups[e].contiguous()
        elif key.endswith(".mlp.experts.down_proj"):
            prefix = key[: -len(".mlp.experts.down_proj")] + f".{block}.experts"
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.{down}.weight"] = value[e].contiguous()
        else:
            out[key.replace(".mlp.gate.", f".{block}.gate.")] = value
    return out
