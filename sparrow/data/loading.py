"""Reading raw text through Hugging Face ``datasets``, streamed: local text, JSON-lines and Parquet files, and hub
datasets by name (``wikimedia/wikipedia`` with config ``20231101.zh``, as the Chinese roots used).

Bad input is reported before anything is trained on it: a missing file is a ``FileNotFoundError`` naming it, a
malformed JSON line or a record without the text field is a ``ValueError`` naming file and line.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

# Suffix -> the ``datasets`` builder that reads it.
LOCAL_FORMATS = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".jsonl": "json", ".json": "json", ".ndjson": "json",
    ".parquet": "parquet",
}
BUILTIN = "builtin"


def resolve_sources(sources: str | Sequence[str]) -> list[str]:
    """Expand globs and directories into files; hub names and ``builtin`` pass through. A path that looks local
    (has a known suffix or starts with ``.``, ``/`` or ``~``) but does not exist is a FileNotFoundError."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    resolved: list[str] = []
    for source in map(str, sources):
        path = Path(source).expanduser()
        if source == BUILTIN:
            resolved.append(source)
        elif path.is_dir():
            files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_FORMATS)
            if not files:
                raise FileNotFoundError(f"{source}: directory has no {sorted(set(LOCAL_FORMATS))} files")
            resolved.extend(files)
        elif path.is_file():
            resolved.append(str(path))
        elif glob.has_magic(source):
            files = sorted(glob.glob(os.path.expanduser(source), recursive=True))
            if not files:
                raise FileNotFoundError(f"{source}: no files match")
            resolved.extend(files)
        elif path.suffix in LOCAL_FORMATS or source.startswith((".", "/", "~")):
            raise FileNotFoundError(f"{source}: no such file")
        else:
            resolved.append(source)  # a hub dataset name
    return resolved


def is_local(source: str) -> bool:
    return source != BUILTIN and Path(source).is_file()


def iter_texts(sources: str | Sequence[str], field: str = "text", *, config: str | None = None, split: str = "train",
               text_unit: str = "document", limit: int | None = None, seed: int = 0) -> Iterator[str]:
    """Yield the documents of ``sources`` in order, streamed.

    ``field``: the column holding the text (JSON-lines, Parquet and hub datasets). ``config``/``split``: for hub
    datasets. ``text_unit``: how plain-text files are cut into documents, "document" (a file), "paragraph"
    (blank-line separated) or "line". ``limit``: stop after this many documents (over all sources).
    ``seed``: the built-in corpus's seed. Empty documents are skipped.
    """
    if text_unit not in ("document", "paragraph", "line"):
        raise ValueError(f"text_unit: must be 'document', 'paragraph' or 'line', got {text_unit!r}")
    count = 0
    for source in resolve_sources(sources):
        if source == BUILTIN:
            from .builtin_corpus import builtin_documents

            stream: Iterator[str] = iter(builtin_documents(seed))
        elif is_local(source):
            stream = _iter_local(source, field, text_unit)
        else:
            stream = _iter_hub(source, field, config, split)
        for text in stream:
            if not text.strip():
                continue
            yield text
            count += 1
            if limit is not None and count >= limit:
                return


def _iter_local(path: str, field: str, text_unit: str) -> Iterator[str]:
    import datasets

    builder = LOCAL_FORMATS.get(Path(path).suffix)
    if builder is None:
        raise ValueError(f"{path}: unknown file type {Path(path).suffix!r}; expected one of {sorted(LOCAL_FORMATS)}")
    if builder == "text":
        # "line" is the builder's own unit; paragraphs are cut here so a paragraph spanning lines stays whole.
        sample_by = "line" if text_unit == "line" else "document"
        ds = datasets.load_dataset("text", data_files=[path], split="train", streaming=True, sample_by=sample_by)
        for row in ds:
            if text_unit == "paragraph":
                yield from (p for p in row["text"].split("\n\n"))
            else:
                yield row["text"]
        return
    if builder == "json" and _is_blank(path):
        return  # datasets cannot infer a schema from nothing; an empty file is simply no documents
    rows = iter(datasets.load_dataset(builder, data_files=[path], split="train", streaming=True))
    row_index = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # pyarrow/pandas parse errors name a row of a chunk, not a line of the file
            located = _locate_json_error(path, field) if builder == "json" else None
            if located is not None:
                raise located from exc
            raise ValueError(f"{path}: could not be read as {builder}: {exc}") from exc
        if field not in row or not isinstance(row[field], str):
            raise _record_error(path, builder, field, row_index, row)
        yield row[field]
        row_index += 1


def _is_blank(path: str, probe: int = 1 << 16) -> bool:
    with open(path, "rb") as f:
        head = f.read(probe)
    return not head.strip() and len(head) < probe


def _record_error(path: str, builder: str, field: str, row_index: int, row: dict) -> ValueError:
    if builder == "json":
        located = _locate_json_error(path, field)
        if located is not None:
            return located
    fields = sorted(k for k, v in row.items() if v is not None)
    value = row.get(field)
    what = f"field {field!r} is {type(value).__name__}, not text" if value is not None else f"no field {field!r}"
    return ValueError(f"{path}: row {row_index + 1}: {what} (fields: {fields})")


def iter_jsonl(path: str | os.PathLike, *, errors: str = "strict") -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSON-lines file; a line that is not JSON is a
    ``ValueError`` naming file and line. The one jsonl reader: callers check the shape of each record.
    ``errors`` is ``open``'s handling of bytes that are not UTF-8."""
    with open(path, encoding="utf-8", errors=errors) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None


def _locate_json_error(path: str, field: str) -> ValueError | None:
    """The first line of a JSON-lines file that is not a JSON object with a string ``field``, as an error naming
    file and line; None when every line is fine (the problem is elsewhere)."""
    try:
        for lineno, record in iter_jsonl(path, errors="replace"):
            if not isinstance(record, dict):
                return ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if field not in record:
                return ValueError(f"{path}:{lineno}: no field {field!r} (fields: {sorted(record)})")
            if not isinstance(record[field], str):
                return ValueError(f"{path}:{lineno}: field {field!r} is {type(record[field]).__name__}, not text")
    except ValueError as exc:
        return exc
    return None


def _iter_hub(name: str, field: str, config: str | None, split: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{name}: not a local file, and the hub has no such dataset ({exc})") from exc
    for index, row in enumerate(ds):
        if field not in row or not isinstance(row[field], str):
            raise ValueError(f"{name}: row {index + 1}: no text field {field!r} (fields: {sorted(row)})")
        yield row[field]
