"""A model folder's weights on disk, in one place: ``config.json`` and ``model.safetensors``, each written
atomically (temporary file + rename) and read with errors that name the file. Used by
``SparrowForCausalLM.save_pretrained``/``from_pretrained``, the Trainer's checkpoints (whose ``model/`` folder
becomes the run's final model) and the reward model.
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


def load_weights(directory: str | os.PathLike, *, made_by: str = "`sparrow pretrain` or a fine-tuning stage"
                 ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config dict, state dict) of a model folder. A missing, truncated or corrupted file is an error that
    names it; ``made_by`` says which command writes such a folder."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: not found (a model folder holds {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}; {made_by} writes one)")
    try:
        config = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{directory / CONFIG_NAME}: not valid JSON ({exc})") from exc
    try:
        state = load_file(str(directory / WEIGHTS_NAME))
    except Exception as exc:  # safetensors raises SafetensorError (or OSError) for truncated or corrupted files
        raise ValueError(f"{directory / WEIGHTS_NAME}: not a readable safetensors file ({exc})") from exc
    return config, state
