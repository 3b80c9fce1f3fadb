"""A model folder's weights on disk, in one place: ``config.json`` and ``model.safetensors``, each written
atomically (temporary file + rename) and read with errors that name the file. Used by
``SparrowForCausalLM.save_pretrained``/``from_pretrained``, the Trainer's checkpoints (whose ``model/`` folder
becomes the run's final model) and the reward model. Reading also takes a Hugging Face folder sharded as
``model.safetensors.index.json`` plus the shards it lists.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(directory: str | os.PathLike, state: dict[str, Tensor], config: dict[str, Any], *,
                 tied_embeddings: bool = False) -> None:
    """Write ``state`` and ``config`` as a model folder. With ``tied_embeddings`` the LM head (the embedding
    matrix again) is left out: safetensors refuses aliased tensors, and loading ties it back."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if tied_embeddings:
        weights.pop("lm_head.weight", None)
    atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(weights, str(path), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda path: path.write_text(json.dumps(config, indent=2) + "\n"))


def weight_files(directory: str | os.PathLike, *, made_by: str = "`sparrow pretrain` or a fine-tuning stage"
                 ) -> list[Path]:
    """The safetensors files of a model folder: the single file, or every shard its index names."""
    directory = Path(directory)
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    index = directory / INDEX_NAME
    if not index.is_file():
        raise FileNotFoundError(f"{directory / WEIGHTS_NAME}: not found, nor a sharded {INDEX_NAME} (a model "
                                f"folder holds {CONFIG_NAME} and {WEIGHTS_NAME}; {made_by} writes one)")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{index}: not a valid safetensors index ({exc})") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no weight_map")
    files = [directory / name for name in sorted(set(weight_map.values()))]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {index} but not found")
    return files


def load_config(directory: str | os.PathLike, *, made_by: str = "`sparrow pretrain` or a fine-tuning stage"
                ) -> dict[str, Any]:
    """The ``config.json`` of a model folder, as a dict; missing or invalid is an error naming the file."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (a model folder holds {CONFIG_NAME} and {WEIGHTS_NAME}; "
                                f"{made_by} writes one)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def load_state(directory: str | os.PathLike, *, made_by: str = "`sparrow pretrain` or a fine-tuning stage"
               ) -> dict[str, Tensor]:
    """The tensors of a model folder, single-file or sharded; a truncated or corrupted file is an error naming it."""
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for path in weight_files(directory, made_by=made_by):
        try:
            state.update(load_file(str(path)))
        except Exception as exc:  # safetensors raises SafetensorError (or OSError) for truncated or corrupted files
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    return state


def load_weights(directory: str | os.PathLike, *, made_by: str = "`sparrow pretrain` or a fine-tuning stage"
                 ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config dict, state dict) of a model folder; ``made_by`` says which command writes such a folder."""
    return load_config(directory, made_by=made_by), load_state(directory, made_by=made_by)
