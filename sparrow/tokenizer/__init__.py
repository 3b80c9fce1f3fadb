"""Byte-level BPE for Sparrow: a C++ encoder byte-exact with HF tokenizers and tiktoken, and training.

    from sparrow.tokenizer import Tokenizer, train_tokenizer
    tok = Tokenizer.from_file("out/tokenizer/tokenizer.json")       # or a .tiktoken rank file
    ids = tok.encode("Hello 世界")
    text = tok.decode(ids)

Chat (special tokens, templates, rendering, stop ids, prompt ids) is :mod:`sparrow.tokenizer.chat`; its names
are importable from here too.
"""

from __future__ import annotations

from .chat import (
    ASSISTANT,
    DEFAULT_CHAT_TEMPLATE,
    END_OF_TURN,
    EOT,
    SPECIAL_TOKENS,
    SYSTEM,
    USER,
    render_chat,
)
from .encoder import PATTERNS, Tokenizer
from .training import merge_tokenizers, train_tokenizer

__all__ = [
    "ASSISTANT", "DEFAULT_CHAT_TEMPLATE", "END_OF_TURN", "EOT", "PATTERNS", "SPECIAL_TOKENS", "SYSTEM", "USER",
    "Tokenizer", "merge_tokenizers", "render_chat", "train_tokenizer",
]
