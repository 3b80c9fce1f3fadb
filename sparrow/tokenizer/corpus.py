"""Corpus tokenization: text corpora (read by :mod:`sparrow.data.loading`) -> a token file
(:mod:`sparrow.data.token_file`) for pretraining, with the C++ encoder on all cores (``sparrow data tokenize``)."""

from __future__ import annotations

import os
import sys
from typing import Iterable, Sequence

from ..data.loading import iter_texts
from ..data.token_file import TokenFileWriter
from .chat import EOT


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
    tokenizer or a path (a tokenizer.json, its folder or a rank file, opened by
    :func:`sparrow.tokenizer.hf_fallback.open_tokenizer`: a checkpoint's layout the C++ encoder refuses runs through
    HF tokenizers). Returns the metadata."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from .hf_fallback import open_tokenizer

        tok_name, tok = str(tokenizer), open_tokenizer(tokenizer)
    else:
        tok_name, tok = tokenizer.name, tokenizer
    eot = tok.special_tokens.get(EOT)
    if eot is None:
        raise ValueError(f"tokenizer {tok_name} has no {EOT} token to separate documents")

    # A str/path or a list/tuple of them names sources (a missing file is an error, never "text"); any
    # other iterable yields the documents themselves.
    if isinstance(sources, (str, os.PathLike)) or (isinstance(sources, (list, tuple)) and
                                                     all(isinstance(s, (str, os.PathLike)) for s in sources)):
        source_list = [str(sources)] if isinstance(sources, (str, os.PathLike)) else [str(s) for s in sources]
        texts: Iterable[str] = iter_texts(source_list, field=field, text_unit=text_unit, limit=limit)
        source_meta: object = source_list
    else:
        texts = sources if limit is None else (t for i, t in zip(range(limit), sources))
        source_meta = "<iterable>"

    progress = None
    with TokenFileWriter(out, vocab_size=tok.vocab_size, eot_id=eot) as writer:
        if show_progress:
            from tqdm import tqdm

            progress = tqdm(unit="B", unit_scale=True, desc=f"tokenize {writer.bin_path.name}", file=sys.stderr)
        try:
            for batch, chars in _batches(texts, batch_chars, 65536):
                writer.write(tok.encode_documents(batch, separator=eot, num_threads=num_threads), len(batch))
                if progress is not None:
                    progress.update(chars)
                    progress.set_postfix(docs=writer.num_documents, tokens=writer.num_tokens)
        finally:
            if progress is not None:
                progress.close()
        return writer.close(tokenizer=tok_name, source=source_meta)
