"""Pretraining data: cleaning (:mod:`.cleaning`), loading through ``datasets`` (:mod:`.loading`), the token file
(:mod:`.token_file`: format, writer, reader), packed batches from token files (:mod:`.packing`) and the built-in
corpus that needs no download (:mod:`.builtin_corpus`). The layer below the tokenizer: text -> token file is
:mod:`sparrow.tokenizer.corpus`, the built-in corpus prepared for pretraining :mod:`sparrow.train.builtin_data`."""

from .builtin_corpus import EvalItem, builtin_documents, eval_items, generated_documents
from .cleaning import Cleaner, default_steps
from .loading import iter_texts, resolve_sources
from .packing import PackedDataset, pack_rows
from .token_file import TokenFile, read_token_file, write_token_file

__all__ = [
    "Cleaner",
    "EvalItem",
    "PackedDataset",
    "TokenFile",
    "builtin_documents",
    "default_steps",
    "eval_items",
    "generated_documents",
    "iter_texts",
    "pack_rows",
    "read_token_file",
    "resolve_sources",
    "write_token_file",
]
