"""Packed pretraining batches from token files.

A token file (written by ``sparrow.tokenizer.corpus``, or :func:`write_token_file`) is ``<prefix>.bin``, raw
little-endian token ids with the end-of-text id after every document, and ``<prefix>.json``, its description::

    {"format": "sparrow-tokens-v1", "dtype": "uint16" | "uint32", "num_tokens", "num_documents",
     "vocab_size", "eot_id", "tokenizer", "source"}

The token stream is cut into fixed windows of ``seq_len`` tokens. Documents run on across windows, but each
window is a row of its own: a document cut at a row boundary continues in another row as a new segment. That
keeps rows independent, so any rank can read any row, and the row order can be shuffled freely. Within a row,
every end-of-text starts a new segment, and the batch carries ``cu_seqlens`` (segment boundaries over the
flattened ``batch * seq_len`` tokens) so attention stays inside each document and positions restart at each.

Order is a function of (seed, position) only: sample ``k`` of the run is window ``perm_e[k mod N]`` of epoch
``e = k // N``, with ``perm_e`` a permutation seeded by (seed, e). So resuming needs one integer, the number of
samples consumed, and a distributed run splits each global batch between ranks without communication.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FORMAT = "sparrow-tokens-v1"
IGNORE_INDEX = -100


def token_file_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(``.bin``, ``.json``) for a token file given as its prefix or either of its two files."""
    path = Path(path)
    if path.suffix in (".bin", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".bin"), path.with_name(path.name + ".json")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def write_token_file(path: str | os.PathLike, documents, *, vocab_size: int, eot_id: int, tokenizer: str = "",
                     source: str = "") -> dict:
    """Write token ids (an iterable of per-document id sequences, without end-of-text) in the token-file format;
    both files land atomically. Returns the metadata. ``sparrow.tokenizer.corpus`` is the production writer;
    this one serves tests and callers that already hold ids."""
    bin_path, json_path = token_file_paths(path)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for_vocab(vocab_size)
    tmp_bin = bin_path.with_name(f".{bin_path.name}.{os.getpid()}.tmp")
    num_tokens = num_documents = 0
    with open(tmp_bin, "wb") as f:
        for ids in documents:
            arr = np.asarray(list(ids) + [eot_id], dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                raise ValueError(f"{bin_path}: token id out of range [0, {vocab_size}) in document {num_documents + 1}")
            f.write(arr.astype(dtype).tobytes())
            num_tokens += arr.size
            num_documents += 1
    meta = {"format": FORMAT, "dtype": "uint16" if dtype.itemsize == 2 else "uint32", "num_tokens": num_tokens,
            "num_documents": num_documents, "vocab_size": vocab_size, "eot_id": eot_id, "tokenizer": tokenizer,
            "source": source}
    tmp_json = json_path.with_name(f".{json_path.name}.{os.getpid()}.tmp")
    tmp_json.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_bin, bin_path)
    os.replace(tmp_json, json_path)
    return meta


class TokenFile:
    """A token file, memory-mapped. Checks the description against the data before anything reads it."""

    def __init__(self, path: str | os.PathLike):
        self.bin_path, self.json_path = token_file_paths(path)
        for p in (self.json_path, self.bin_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: token file not found (write one with `sparrow data tokenize`)")
        try:
            meta = json.loads(self.json_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.json_path}: not valid JSON ({exc})") from exc
        required = ("format", "dtype", "num_tokens", "vocab_size", "eot_id")
        missing = [k for k in required if k not in meta]
        if missing:
            raise ValueError(f"{self.json_path}: missing keys {missing}")
        if meta["format"] != FORMAT:
            raise ValueError(f"{self.json_path}: format {meta['format']!r}, expected {FORMAT!r}")
        if meta["dtype"] not in ("uint16", "uint32"):
            raise ValueError(f"{self.json_path}: dtype must be uint16 or uint32, got {meta['dtype']!r}")
        self.meta = meta
        self.dtype = np.dtype("<u2" if meta["dtype"] == "uint16" else "<u4")
        size = self.bin_path.stat().st_size
        if size != meta["num_tokens"] * self.dtype.itemsize:
            raise ValueError(f"{self.bin_path}: {size} bytes, but {self.json_path.name} says {meta['num_tokens']} "
                             f"{meta['dtype']} tokens ({meta['num_tokens'] * self.dtype.itemsize} bytes)")
        if meta["num_tokens"] == 0:
            raise ValueError(f"{self.bin_path}: the token file is empty (no documents)")
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        self.vocab_size: int = int(meta["vocab_size"])
        self.eot_id: int = int(meta["eot_id"])

    def __len__(self) -> int:
        return int(self.meta["num_tokens"])

    def unigram_entropy(self) -> float:
        """Entropy, in nats, of the token frequencies: the loss of the best model that ignores context.
        A model that learns anything from context goes below it."""
        counts = np.bincount(np.asarray(self.tokens), minlength=self.vocab_size).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


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
