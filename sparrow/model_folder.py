"""A model folder and its tokenizer: the one place that decides where a model's tokenizer is, for every command,
the fine-tuning stages, the demo and the reward model.

A model folder written by a training stage holds ``config.json``, ``model.safetensors`` and the run's
``tokenizer.json`` (+ ``tokenizer_config.json``). A checkpoint's model folder (``<out_dir>/checkpoints/step_N/
model``) holds no tokenizer: the run's is in ``<out_dir>``, so the folder's parents are searched too.
"""

from __future__ import annotations

import json
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
    """The model's tokenizer: Sparrow's C++ encoder when it implements the tokenizer.json's pipeline, else HF
    ``tokenizers`` (one line on stderr says why; encoding is slower). It carries the checkpoint's chat settings
    for :mod:`sparrow.tokenizer.chat`: ``chat_template`` (tokenizer_config.json's Jinja, or None),
    ``chat_tokens`` (its bos/eos token texts, which templates use) and ``eos_ids`` (tokenizer_config's
    eos_token and config.json's eos_token_id, which generation stops on)."""
    from .tokenizer.hf_fallback import open_tokenizer

    path = find_tokenizer(model_dir, tokenizer)
    tok = open_tokenizer(path)
    tok_config = _read_json(path.parent / "tokenizer_config.json")
    tok.chat_template = tok_config.get("chat_template") if isinstance(tok_config.get("chat_template"), str) else None
    tok.chat_tokens = {k: _token_text(tok_config.get(k)) for k in ("bos_token", "eos_token")
                       if _token_text(tok_config.get(k))}
    eos = [tok.token_to_id(tok.chat_tokens["eos_token"])] if "eos_token" in tok.chat_tokens else []
    model_eos = _read_json(Path(model_dir) / "config.json").get("eos_token_id")
    eos += model_eos if isinstance(model_eos, list) else [model_eos]
    tok.eos_ids = [i for i in dict.fromkeys(eos) if isinstance(i, int)]
    return tok


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value) -> str | None:
    """tokenizer_config.json spells a token as its text or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def load_model_and_tokenizer(model_dir: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                             backend: str | None = None):
    """(model in eval mode, tokenizer) from a model folder or a checkpoint's model folder."""
    from .model import SparrowForCausalLM

    tok = load_tokenizer(model_dir, tokenizer)  # first: a folder without a tokenizer fails before loading weights
    return SparrowForCausalLM.from_pretrained(model_dir, backend=backend).eval(), tok
