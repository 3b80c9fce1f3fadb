"""The built-in corpus (:mod:`sparrow.data.builtin_corpus`) as a token file for pretraining: clean it, train a byte-level BPE tokenizer on it and tokenize it, once,
into a cache folder keyed by every setting that changes the result, so later runs (and every rank of a distributed
run) reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..data.builtin_corpus import builtin_documents
from ..data.token_file import token_file_paths, write_metadata

TOKENIZER_FILE = "tokenizer.json"
# Bump when the preparation changes in a way the cache key does not capture.
_PREPARE_VERSION = 2  # 2: cleaned with sparrow.data.cleaning; reading passages


@dataclass(frozen=True)
class PreparedData:
    tokens: Path  # token file prefix
    tokenizer_dir: Path  # holds tokenizer.json
    num_documents: int
    cleaning: dict  # per cleaning step: documents removed and changed


def cleaning_steps():
    """The corpus cleaner's default steps; near-duplicate removal only where ``datasketch`` is installed (the
    step names are part of the cache key, so the two kinds of install never share a cache entry)."""
    from ..data.cleaning import default_steps, near_dedup_available

    return default_steps(near_dedup=near_dedup_available())


def prepare_builtin(cache_dir: str | os.PathLike, *, vocab_size: int, seed: int = 0, python_docs: bool = True,
                    arithmetic_docs: int = 1000, num_people: int = 240, reading_docs: int = 1000,
                    split_digits: bool = False, log=print) -> PreparedData:
    """Cleaned corpus, tokenizer and token file for the built-in corpus, built on first use and cached under
    ``cache_dir``."""
    from ..data.cleaning import Cleaner

    steps = cleaning_steps()
    settings = {"version": _PREPARE_VERSION, "vocab_size": vocab_size, "seed": seed, "python_docs": python_docs,
                "arithmetic_docs": arithmetic_docs, "num_people": num_people, "reading_docs": reading_docs,
                **({"split_digits": True} if split_digits else {}),  # absent when off: earlier caches stay valid
                "cleaning": [name for name, _ in steps], "tokenizer": _backend_name(),
                "python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"builtin-v{vocab_size}-s{seed}-{key}"
    prefix = folder / "tokens"
    bin_path, json_path = token_file_paths(prefix)
    if json_path.is_file() and bin_path.is_file() and (folder / TOKENIZER_FILE).is_file():
        meta = json.loads(json_path.read_text())
        report = json.loads((folder / "cleaning.json").read_text()) if (folder / "cleaning.json").is_file() else {}
        return PreparedData(prefix, folder, int(meta["num_documents"]), report)
    log(f"preparing the built-in corpus in {folder} (once; later runs reuse it)")
    raw = builtin_documents(seed, python_docs=python_docs, arithmetic_docs=arithmetic_docs, num_people=num_people,
                            reading_docs=reading_docs)
    cleaner = Cleaner(steps)
    docs = list(cleaner(raw))
    log("cleaning:\n" + cleaner.report())
    report = {"documents_in": cleaner.documents_in, "documents_out": cleaner.documents_out,
              "steps": {s.name: {"removed": s.removed, "changed": s.changed} for s in cleaner.stats}}
    # Built in a private folder and renamed into place, so concurrent or killed preparations never leave
    # a half-written cache entry that a later run would trust.
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        train_bpe(docs, vocab_size, tmp, split_digits=split_digits)
        tokenize(docs, tmp / TOKENIZER_FILE, tmp / "tokens", source=f"builtin(seed={seed})",
                 recorded_tokenizer=str(folder / TOKENIZER_FILE))
        (tmp / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
        (tmp / "cleaning.json").write_text(json.dumps(report, indent=2) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / TOKENIZER_FILE).is_file():  # lost a race to another process that finished: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedData(prefix, folder, len(docs), report)


def _backend_name() -> str:
    return "sparrow.tokenizer"


def train_bpe(docs: list[str], vocab_size: int, folder: Path, *, split_digits: bool = False) -> Path:
    """Train Sparrow's byte-level BPE (with its special tokens and chat template) on ``docs`` into ``folder``;
    returns the tokenizer.json path."""
    from ..tokenizer import train_tokenizer

    train_tokenizer(iter(docs), vocab_size, folder, show_progress=False, split_digits=split_digits)
    return folder / TOKENIZER_FILE


def tokenize(docs: list[str], tokenizer: Path, prefix: Path, *, source: str, recorded_tokenizer: str) -> dict:
    from ..tokenizer.corpus import tokenize_corpus

    # An iterator, not a list: tokenize_corpus reads a list of strings as file names.
    meta = tokenize_corpus(iter(docs), prefix, tokenizer, show_progress=False)
    bin_path, json_path = token_file_paths(prefix)
    meta.update(source=source, tokenizer=recorded_tokenizer)  # where the tokenizer is once the folder is in place
    write_metadata(json_path, meta)
    return meta
