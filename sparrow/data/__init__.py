"""Pretraining data: cleaning (:mod:`.cleaning`), loading through ``datasets`` (:mod:`.loading`), packed batches
from token files (:mod:`.packing`) and the built-in corpus that needs no download (:mod:`.builtin_corpus`).
Tokenization itself (text -> token file) lives in :mod:`sparrow.tokenizer.corpus`."""

from .builtin_corpus import EvalItem, builtin_documents, eval_items, generated_documents
from .cleaning import Cleaner, default_steps
from .loading import iter_texts, resolve_sources
from .packing import PackedDataset, TokenFile, pack_rows, write_token_file

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
    "resolve_sources",
    "write_token_file",
]
