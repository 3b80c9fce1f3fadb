"""Packed pretraining batches from token files.

The token stream of a token file (:mod:`sparrow.data.token_file`) is cut into fixed windows of ``seq_len`` tokens. Documents run on across windows, but each
window is a row of its own: a document cut at a row boundary continues in another row as a new segment. That
keeps rows independent, so any rank can read any row, and the row order can be shuffled freely. Within a row,
every end-of-text starts a new segment, and the batch carries ``cu_seqlens`` (segment boundaries over the
flattened ``batch * seq_len`` tokens) so attention stays inside each document and positions restart at each.

Order is a function of (seed, position) only: sample ``k`` of the run is window ``perm_e[k mod N]`` of epoch
``e = k // N``, with ``perm_e`` a permutation seeded by (seed, e). So resuming needs one integer, the number of
samples consumed, and a distributed run splits each global batch between ranks without communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model import IGNORE_INDEX
from .token_file import TokenFile, write_token_file  # noqa: F401  (write_token_file: its old home)


def pack_rows(rows: np.ndarray, eot_id: int) -> dict:
    """A batch from ``rows`` (batch, seq_len) of token ids: ``input_ids``, ``labels`` (-100 at each document's first
    token: its predecessor is the previous document's end-of-text), ``cu_seqlens`` (int32, segment boundaries over
    the flattened tokens: every row start and every token after an end-of-text) and ``max_seqlen``."""
    b, t = rows.shape
    flat = rows.reshape(-1).astype(np.int64)
    after_eot = np.flatnonzero(flat[:-1] == eot_id) + 1
    doc_starts = after_eot[after_eot % t != 0]  # a start that falls on a row start is a row start already
    starts = np.union1d(np.arange(0, b * t, t), doc_starts)
    cu = np.append(starts, b * t).astype(np.int32)
    labels = flat.copy()
    labels[doc_starts] = IGNORE_INDEX
    return {
        "input_ids": torch.from_numpy(flat.reshape(b, t)),
        "labels": torch.from_numpy(labels.reshape(b, t)),
        "cu_seqlens": torch.from_numpy(cu),
        "max_seqlen": int(np.diff(cu).max()),
    }


def count_targets(batch: dict) -> int:
    """Positions that carry a loss (the model drops each row's first label when it shifts)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclass
class PackedDataset:
    """Fixed windows of a token file, split into training and validation windows, in a seeded order.

    The last ``val_windows`` windows are held out for validation (the tail of the file: the tokenization step
    writes documents in corpus order, so shuffle the corpus if its tail is unrepresentative)."""

    tokens: TokenFile
    seq_len: int
    seed: int = 0
    val_windows: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"seq_len: must be at least 2, got {self.seq_len}")
        total = len(self.tokens) // self.seq_len
        if total - self.val_windows < 1:
            raise ValueError(f"{self.tokens.bin_path}: {len(self.tokens)} tokens make {total} windows of seq_len "
                             f"{self.seq_len}, too few for training with {self.val_windows} held out for validation")
        self.num_train = total - self.val_windows
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _window(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return np.asarray(self.tokens.tokens[start : start + self.seq_len])

    def train_index(self, k: int) -> int:
        """The window read as the run's k-th training sample."""
        epoch, offset = divmod(k, self.num_train)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_train)
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def train_batch(self, first_sample: int, count: int) -> dict:
        rows = np.stack([self._window(self.train_index(k)) for k in range(first_sample, first_sample + count)])
        return pack_rows(rows, self.tokens.eot_id)

    def val_batch(self, first_sample: int, count: int) -> dict:
        """Rows ``first_sample .. first_sample + count`` of the validation windows, in file order."""
        if first_sample < 0 or first_sample + count > self.val_windows:
            raise IndexError(f"validation rows {first_sample}..{first_sample + count} outside 0..{self.val_windows}")
        rows = np.stack([self._window(self.num_train + k) for k in range(first_sample, first_sample + count)])
        return pack_rows(rows, self.tokens.eot_id)

    @property
    def num_val_samples(self) -> int:
        return self.val_windows


def rank_slice(first_sample: int, micro_batch: int, grad_accum: int, rank: int, world_size: int,
               micro_step: int) -> int:
    """First sample of ``rank``'s ``micro_step``-th micro-batch in the global batch starting at ``first_sample``.
    Micro-batches interleave ranks, so the same global batch is read whatever the split between ranks and
    accumulation steps."""
    return first_sample + (micro_step * world_size + rank) * micro_batch
