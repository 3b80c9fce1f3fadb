"""The token file, Sparrow's pretraining data on disk: format, writer and reader, in one place.

``<prefix>.bin`` holds the little-endian token ids of every document, each followed by the end-of-text id
(uint16 when the vocabulary fits, else uint32); ``<prefix>.json`` describes it::

    {"format": "sparrow-tokens-v1", "dtype": "uint16" | "uint32", "num_tokens", "num_documents",
     "vocab_size", "eot_id", "tokenizer", "source"}

Both files are written under temporary names and renamed into place (``.bin`` first, ``.json`` last), so a
reader that finds the ``.json`` finds a complete token file; an interrupted write leaves the previous file (or
none). :func:`sparrow.tokenizer.corpus.tokenize_corpus` writes one from text; :func:`write_token_file` from ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

FORMAT = "sparrow-tokens-v1"


def token_file_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(``.bin``, ``.json``) for a token file given as its prefix or either of its two files."""
    path = Path(path)
    if path.suffix in (".bin", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".bin"), path.with_name(path.name + ".json")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


class TokenFileWriter:
    """Streams token ids into a token file; :meth:`close` renames both files into place and returns the
    metadata. Used as a context manager, an exception removes the temporary file and keeps what was there."""

    def __init__(self, path: str | os.PathLike, *, vocab_size: int, eot_id: int):
        self.bin_path, self.json_path = token_file_paths(path)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.eot_id = vocab_size, eot_id
        self.dtype = dtype_for_vocab(vocab_size)
        self.num_tokens = self.num_documents = 0
        self._tmp_bin = self.bin_path.with_name(f".{self.bin_path.name}.{os.getpid()}.tmp")
        self._file = open(self._tmp_bin, "wb")

    def write(self, ids: np.ndarray, documents: int) -> None:
        """Append ``ids`` (``documents`` whole documents, each already followed by the end-of-text id)."""
        self._file.write(np.asarray(ids).astype(self.dtype, copy=False).tobytes())
        self.num_tokens += int(np.asarray(ids).size)
        self.num_documents += documents

    def close(self, *, tokenizer: str = "", source: object = "") -> dict:
        self._file.close()
        os.replace(self._tmp_bin, self.bin_path)
        meta = {"format": FORMAT, "dtype": "uint16" if self.dtype.itemsize == 2 else "uint32",
                "num_tokens": self.num_tokens, "num_documents": self.num_documents, "vocab_size": self.vocab_size,
                "eot_id": self.eot_id, "tokenizer": tokenizer, "source": source}
        write_metadata(self.json_path, meta)
        return meta

    def abort(self) -> None:
        self._file.close()
        self._tmp_bin.unlink(missing_ok=True)

    def __enter__(self) -> "TokenFileWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_metadata(json_path: Path, meta: dict) -> None:
    """Write (or rewrite) a token file's ``.json`` atomically."""
    tmp = json_path.with_name(f".{json_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, json_path)


def write_token_file(path: str | os.PathLike, documents: Iterable[Sequence[int]], *, vocab_size: int, eot_id: int,
                     tokenizer: str = "", source: str = "") -> dict:
    """Write token ids (an iterable of per-document id sequences, without end-of-text) as a token file; returns
    the metadata. For tests and callers that already hold ids; text goes through ``tokenize_corpus``."""
    with TokenFileWriter(path, vocab_size=vocab_size, eot_id=eot_id) as writer:
        for ids in documents:
            arr = np.asarray(list(ids) + [eot_id], dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                raise ValueError(f"{writer.bin_path}: token id out of range [0, {vocab_size}) in document "
                                 f"{writer.num_documents + 1}")
            writer.write(arr, 1)
        return writer.close(tokenizer=tokenizer, source=source)


def read_token_file(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """A token file's ids (a read-only memmap; an empty array for an empty file) and its metadata, after
    checking the description against the data."""
    bin_path, json_path = token_file_paths(path)
    for p in (json_path, bin_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: token file not found (write one with `sparrow data tokenize`)")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{json_path}: not valid JSON ({exc})") from exc
    missing = [k for k in ("format", "dtype", "num_tokens", "vocab_size", "eot_id") if k not in meta]
    if missing:
        raise ValueError(f"{json_path}: missing keys {missing}")
    if meta["format"] != FORMAT:
        raise ValueError(f"{json_path}: format {meta['format']!r}, expected {FORMAT!r}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"{json_path}: dtype must be uint16 or uint32, got {meta['dtype']!r}")
    dtype = np.dtype("<u2" if meta["dtype"] == "uint16" else "<u4")
    size = bin_path.stat().st_size
    if size != meta["num_tokens"] * dtype.itemsize:
        raise ValueError(f"{bin_path}: {size} bytes, but {json_path.name} says {meta['num_tokens']} "
                         f"{meta['dtype']} tokens ({meta['num_tokens'] * dtype.itemsize} bytes)")
    if meta["num_tokens"] == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=dtype), meta
    return np.memmap(bin_path, dtype=dtype, mode="r"), meta


class TokenFile:
    """A token file, memory-mapped, for training: as :func:`read_token_file`, and an empty file is an error."""

    def __init__(self, path: str | os.PathLike):
        self.bin_path, self.json_path = token_file_paths(path)
        self.tokens, self.meta = read_token_file(path)
        if self.meta["num_tokens"] == 0:
            raise ValueError(f"{self.bin_path}: the token file is empty (no documents)")
        self.dtype = self.tokens.dtype
        self.vocab_size: int = int(self.meta["vocab_size"])
        self.eot_id: int = int(self.meta["eot_id"])

    def __len__(self) -> int:
        return int(self.meta["num_tokens"])

    def unigram_entropy(self) -> float:
        """Entropy, in nats, of the token frequencies: the loss of the best model that ignores context.
        A model that learns anything from context goes below it."""
        counts = np.bincount(np.asarray(self.tokens), minlength=self.vocab_size).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())
