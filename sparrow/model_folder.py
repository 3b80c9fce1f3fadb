"""A model folder and its tokenizer: the one place that decides where a model's tokenizer is, for every command,
the fine-tuning stages, the demo and the reward model.

A model folder written by a training stage holds ``config.json``, ``model.safetensors`` and the run's
``tokenizer.json`` (+ ``tokenizer_config.json``). A checkpoint's model folder (``<out_dir>/checkpoints/step_N/
model``) holds no tokenizer: the run's is in ``<out_dir>``, so the folder's parents are searched too.
"""

from __future__ import annotations

import os
from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"
# <out_dir>/checkpoints/step_N/model -> <out_dir>: three levels up.
_PARENTS_SEARCHED = 3


def find_tokenizer(model_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Path:
    """The ``tokenizer.json`` for ``model_dir``: ``tokenizer`` (a file or its folder) when given, else the one
    in the model folder or, for a checkpoint, in its run folder."""
    if tokenizer is not None:
        path = Path(tokenizer)
        path = path / TOKENIZER_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer not found")
        return path
    model_dir = Path(model_dir)
    for folder in (model_dir, *list(model_dir.parents)[:_PARENTS_SEARCHED]):
        if (folder / TOKENIZER_FILE).is_file():
            return folder / TOKENIZER_FILE
    raise FileNotFoundError(f"{model_dir / TOKENIZER_FILE}: not found, nor in the run folder above it (a model folder "
                            "written by `sparrow pretrain` or a fine-tuning stage has one)")


def load_tokenizer(model_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None):
    from .tokenizer import Tokenizer

    return Tokenizer.from_file(find_tokenizer(model_dir, tokenizer))


def load_model_and_tokenizer(model_dir: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                             backend: str | None = None):
    """(model in eval mode, tokenizer) from a model folder or a checkpoint's model folder."""
    from .model import SparrowForCausalLM

    tok = load_tokenizer(model_dir, tokenizer)  # first: a folder without a tokenizer fails before loading weights
    return SparrowForCausalLM.from_pretrained(model_dir, backend=backend).eval(), tok
