"""Corpus tokenization: text corpora -> a memory-mapped token file for pretraining.

Format ``sparrow-tokens-v1``: ``<out>.bin`` holds the little-endian token ids of every document, each
followed by the end-of-text id (uint16 when the vocabulary fits, else uint32); ``<out>.json`` describes
it::

    {"format": "sparrow-tokens-v1", "dtype": "uint16", "num_tokens": ..., "num_documents": ...,
     "vocab_size": ..., "eot_id": ..., "tokenizer": ..., "source": [...]}

Both files are written under temporary names and renamed into place (``.bin`` first, ``.json`` last), so
a reader that finds the ``.json`` finds a complete token file; an interrupted run leaves the previous
output (or none) and is simply rerun.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

FORMAT = "sparrow-tokens-v1"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def output_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out)
    if out.suffix in (".bin", ".json"):
        out = out.with_suffix("")
    return out.with_name(out.name + ".bin"), out.with_name(out.name + ".json")


def read_token_file(out: str | os.PathLike) -> tuple[np.memmap, dict]:
    """Open a token file written by :func:`tokenize_corpus` as a read-only memmap plus its metadata."""
    bin_path, meta_path = output_paths(out)
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no such file (tokenize the corpus first)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    if meta["num_tokens"] == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=dtype), meta
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    if tokens.shape[0] != meta["num_tokens"]:
        raise ValueError(f"{bin_path}: has {tokens.shape[0]} tokens, metadata says {meta['num_tokens']}")
    return tokens, meta


def _batches(texts: Iterable[str], max_chars: int, max_docs: int):
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_chars or len(batch) >= max_docs:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def tokenize_corpus(sources: str | Sequence[str] | Iterable[str], out: str | os.PathLike, tokenizer, *,
                    field: str = "text", text_unit: str = "document", num_threads: int | None = None,
                    limit: int | None = None, show_progress: bool = True, batch_chars: int = 8 << 20) -> dict:
    """Tokenize ``sources`` (files/globs/directories/hub names read by :func:`sparrow.data.loading.iter_texts`,
    or an iterable of strings) into ``<out>.bin`` + ``<out>.json``. ``tokenizer``: a
    :class:`~sparrow.tokenizer.Tokenizer` or a path for :meth:`Tokenizer.from_file`. Returns the metadata."""
    from . import EOT, Tokenizer

    tok_name = str(tokenizer) if not isinstance(tokenizer, Tokenizer) else tokenizer.name
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(tokenizer)
    eot = tok.special_tokens.get(EOT)
    if eot is None:
        raise ValueError(f"tokenizer {tok_name} has no {EOT} token to separate documents")
    dtype = token_dtype(tok.vocab_size)

    # A str/path or a list/tuple of them names sources (a missing file is an error, never "text"); any
    # other iterable yields the documents themselves.
    if isinstance(sources, (str, os.PathLike)) or (isinstance(sources, (list, tuple)) and
                                                     all(isinstance(s, (str, os.PathLike)) for s in sources)):
        from sparrow.data.loading import iter_texts

        source_list = [str(sources)] if isinstance(sources, (str, os.PathLike)) else [str(s) for s in sources]
        texts: Iterable[str] = iter_texts(source_list, field=field, text_unit=text_unit, limit=limit)
        source_meta: object = source_list
    else:
        texts = sources if limit is None else (t for i, t in zip(range(limit), sources))
        source_meta = "<iterable>"

    bin_path, meta_path = output_paths(out)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin = bin_path.with_name(f".{bin_path.name}.{os.getpid()}.tmp")
    num_tokens = num_docs = 0
    progress = None
    if show_progress:
        from tqdm import tqdm

        progress = tqdm(unit="B", unit_scale=True, desc=f"tokenize {bin_path.name}", file=sys.stderr)
    try:
        with open(tmp_bin, "wb") as f:
            for batch, chars in _batches(texts, batch_chars, 65536):
                ids = tok.encode_documents(batch, separator=eot, num_threads=num_threads)
                if dtype.itemsize == 2 and ids.size and int(ids.max()) > 65535:  # pragma: no cover - guarded by vocab_size
                    raise ValueError("token id does not fit in uint16")
                f.write(ids.astype(dtype, copy=False).tobytes())
                num_tokens += int(ids.size)
                num_docs += len(batch)
                if progress is not None:
                    progress.update(chars)
                    progress.set_postfix(docs=num_docs, tokens=num_tokens)
        os.replace(tmp_bin, bin_path)
    except BaseException:
        tmp_bin.unlink(missing_ok=True)
        raise
    finally:
        if progress is not None:
            progress.close()
    meta = {
        "format": FORMAT,
        "dtype": "uint16" if dtype.itemsize == 2 else "uint32",
        "num_tokens": num_tokens,
        "num_documents": num_docs,
        "vocab_size": tok.vocab_size,
        "eot_id": eot,
        "tokenizer": tok_name,
        "source": source_meta,
    }
    tmp_meta = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp_meta, meta_path)
    return meta


def register_data_commands(data_subparsers) -> None:
    """Adds ``sparrow data tokenize`` (called by sparrow.data.cli)."""
    p = data_subparsers.add_parser(
        "tokenize", help="tokenize a corpus into a memory-mapped token file (<out>.bin + <out>.json)",
        description="Reads text/jsonl/parquet files, globs, directories or hub datasets and writes the token ids "
                    "of every document followed by <|endoftext|>, using the C++ encoder on all cores.")
    p.add_argument("inputs", nargs="+", metavar="IN", help="files, globs, directories, hub names or 'builtin'")
    p.add_argument("--tokenizer", "-t", required=True, help="tokenizer.json (or its directory) or a .tiktoken file")
    p.add_argument("--output", "-o", required=True, help="output prefix: writes OUT.bin and OUT.json")
    p.add_argument("--field", default="text", help="text column of jsonl/parquet inputs (default: text)")
    p.add_argument("--text-unit", default="document", choices=("document", "paragraph", "line"),
                   help="how plain-text files are cut into documents (default: one per file)")
    p.add_argument("--split-lines", action="store_true", help="shorthand for --text-unit line")
    p.add_argument("--threads", type=int, default=None, help="encoder threads (default: all cores)")
    p.add_argument("--limit", type=int, default=None, help="stop after this many documents")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_tokenize)


def _run_tokenize(args) -> int:
    meta = tokenize_corpus(args.inputs, args.output, args.tokenizer, field=args.field,
                           text_unit="line" if args.split_lines else args.text_unit, num_threads=args.threads,
                           limit=args.limit, show_progress=not args.no_progress)
    bin_path, meta_path = output_paths(args.output)
    print(f"wrote {bin_path} ({meta['num_tokens']} tokens, {meta['num_documents']} documents, {meta['dtype']}) "
          f"and {meta_path}")
    return 0
