"""Checkpoints that a resumed run continues from exactly.

``<out_dir>/checkpoints/step_<N>/`` holds

* ``model/``: ``config.json`` + ``model.safetensors``, the format of ``SparrowForCausalLM.save_pretrained``
  (loadable with ``from_pretrained``);
* ``trainer.pt``: optimizer and scheduler state, the step, the data position (samples consumed), the RNG
  states of every rank, and the elapsed time;
* ``config.yaml``: the resolved config.

A checkpoint is built in a hidden temporary folder and renamed into place, so a run killed while saving leaves
the previous checkpoints intact and no half-written ``step_*`` folder: every ``step_*`` folder is complete.
Full (unsharded) state dicts are written, gathered from FSDP shards when needed, so a checkpoint resumes on
any number of ranks.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..model import SparrowConfig
from ..safetensors_io import load_weights, save_weights
from . import distributed

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer.pt"


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def remove_partial(out_dir: str | os.PathLike) -> None:
    """Delete temporary folders of saves that a killed run left behind (never a complete checkpoint)."""
    root = checkpoint_root(out_dir)
    if root.is_dir():
        for path in root.glob(".tmp_step_*"):
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on the CPU (a collective under FSDP: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, trainer_state: dict[str, Any], config_yaml: str, info: distributed.DistInfo,
                    keep: int = 2) -> Path:
    """Write ``step_<step>`` (rank 0 writes; every rank must call, for the state gathering). Returns its path."""
    model_sd, optim_sd = _full_state(distributed.unwrap(model), optimizer)
    rngs = distributed.all_gather_object(rng_state(), info)
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:08d}"
    if info.is_main:
        config: SparrowConfig = distributed.unwrap(model).config
        tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_weights(tmp / "model", model_sd, config.to_hf_dict(), tied_embeddings=config.tie_word_embeddings)
        torch.save({**trainer_state, "step": step, "optimizer": optim_sd,
                    "scheduler": scheduler.state_dict(), "rng": rngs}, tmp / TRAINER_STATE)
        (tmp / "config.yaml").write_text(config_yaml)
        _kill_point("SPARROW_TEST_KILL_DURING_SAVE", step)
        _fsync_tree(tmp)
        if final.exists():  # the same step saved before a crash and now recomputed: the new one replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(info)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    info: distributed.DistInfo) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG state from ``path``; returns the trainer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    raw = distributed.unwrap(model)
    _, weights = load_weights(path / "model")
    if raw.config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(raw, weights, options=options)
    set_optimizer_state_dict(raw, optimizer, state["optimizer"], options=options)
    scheduler.load_state_dict(state["scheduler"])
    rngs = state.get("rng") or []
    if len(rngs) == info.world_size:
        set_rng_state(rngs[info.rank])
    return state


def _kill_point(variable: str, step: int) -> None:
    """Test hook: SIGKILL this process at a named point of ``step``, to prove resuming needs nothing more."""
    if os.environ.get(variable) == str(step):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
