"""Read the weights and config of a Hugging Face folder: ``config.json`` plus ``model.safetensors`` or shards
listed in ``model.safetensors.index.json``.

Sparrow's parameter names are transformers' for the supported architectures, so the weight mapping is the
identity, less what a Sparrow model does not hold: ``lm_head.weight`` of a tied head (the embedding is used) and
the rotary ``inv_freq`` buffers older transformers versions saved (Sparrow rebuilds its tables from the config).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected a Hugging Face model folder)")
    return json.loads(path.read_text())


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of the folder: the single file, or every shard the index names."""
    directory = Path(directory)
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    index = directory / INDEX_NAME
    if not index.is_file():
        raise FileNotFoundError(f"{directory / WEIGHTS_NAME}: not found, nor a sharded {INDEX_NAME}")
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no weight_map")
    files = [directory / name for name in sorted(set(weight_map.values()))]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {index} but not found")
    return files


def read_state_dict(directory: str | Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for path in weight_files(directory):
        state.update(load_file(str(path)))
    return {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
