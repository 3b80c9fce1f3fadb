"""``HFTokenizer``: a checkpoint's tokenizer.json that the C++ encoder refuses (a normalizer or pre-tokenizer it
does not implement, a non-BPE model...), run by HF ``tokenizers`` behind the methods of
:class:`sparrow.tokenizer.Tokenizer` that Sparrow uses, with the same special-token conventions.

Only :func:`open_tokenizer` makes one, after the C++ encoder said why it cannot.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import AbstractSet, Collection, Iterable, Literal, Sequence


class HFTokenizer:
    """HF ``tokenizers.Tokenizer`` with Sparrow's ``Tokenizer`` conventions: ``encode`` never adds a BOS (no
    post-processor), ``allowed_special`` tokens are split out as their ids, a disallowed special token in the
    text raises ``ValueError`` (default) or, with ``disallowed_special=()``, is encoded as ordinary text;
    ``decode`` keeps special tokens."""

    def __init__(self, path: str | os.PathLike):
        import tokenizers

        self.name = str(path)
        self._tok = tokenizers.Tokenizer.from_file(str(path))
        added = self._tok.get_added_tokens_decoder()
        self.special_tokens: dict[str, int] = {t.content: i for i, t in added.items() if t.special}
        self._plain = tokenizers.Tokenizer.from_file(str(path))  # encodes special-token text as ordinary text
        self._plain.encode_special_tokens = True
        self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

    def __reduce__(self):
        return (HFTokenizer, (self.name,))

    # ---- encoding -----------------------------------------------------------------------------------
    def _allowed(self, allowed_special) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        unknown = set(allowed_special or ()) - set(self.special_tokens)
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]!r} is not a special token of this tokenizer")
        return set(allowed_special or ())

    def encode(self, text: str, *, allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        allowed = self._allowed(allowed_special)
        present = [t for t in self.special_tokens if t in text]
        if not present:
            return self._tok.encode(text, add_special_tokens=False).ids
        disallowed = set(self.special_tokens) if disallowed_special == "all" else set(disallowed_special or ())
        for token in present:
            if token in disallowed and token not in allowed:
                raise ValueError(f"text contains the disallowed special token {token}")
        if allowed >= set(present):
            return self._tok.encode(text, add_special_tokens=False).ids
        # Allowed specials split out as ids (leftmost-longest), the rest encoded with specials as plain text.
        splitter = re.compile("|".join(re.escape(t) for t in sorted(allowed, key=len, reverse=True)) or r"(?!)")
        ids, last = [], 0
        for match in splitter.finditer(text):
            ids += self._plain.encode(text[last:match.start()], add_special_tokens=False).ids
            ids.append(self.special_tokens[match.group()])
            last = match.end()
        return ids + self._plain.encode(text[last:], add_special_tokens=False).ids

    def encode_ordinary(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None, *,
                     allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
                     disallowed_special: Literal["all"] | Collection[str] = "all") -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of str, not a str")
        return [self.encode(t, allowed_special=allowed_special, disallowed_special=disallowed_special) for t in texts]

    def encode_ordinary_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_ordinary_batch takes a sequence of str, not a str")
        return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

    def encode_documents(self, texts: Sequence[str], separator: int | None = None, num_threads: int | None = None):
        import numpy as np

        sep = [] if separator is None else [int(separator)]
        return np.array([t for ids in self.encode_ordinary_batch(texts) for t in ids + sep], dtype=np.uint32)

    # ---- decoding and vocabulary --------------------------------------------------------------------
    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def decode_batch(self, batch: Sequence[Iterable[int]], *, errors: str = "replace",
                     num_threads: int | None = None) -> list[str]:
        return self._tok.decode_batch([list(ids) for ids in batch], skip_special_tokens=False)

    def decode_bytes_batch(self, batch: Sequence[Iterable[int]], *, num_threads: int | None = None) -> list[bytes]:
        return [t.encode("utf-8") for t in self.decode_batch(batch)]

    @property
    def vocab_size(self) -> int:
        """Largest id + 1, added tokens included."""
        return self._vocab_size

    @property
    def eot_id(self) -> int | None:
        return self.special_tokens.get("<|endoftext|>")

    def token_to_id(self, token: str | bytes) -> int | None:
        """The id of a token given by its text: a special or added token, or text that is exactly one token."""
        if isinstance(token, bytes):
            token = token.decode("utf-8", errors="replace")
        found = self._tok.token_to_id(token)
        if found is not None:
            return found
        ids = self.encode_ordinary(token)
        return ids[0] if len(ids) == 1 and self.decode(ids) == token else None

    def id_to_token(self, id: int) -> bytes:
        if not 0 <= id < self.vocab_size or self._tok.id_to_token(id) is None:
            raise IndexError(f"token id {id} is not in the vocabulary")
        return self.decode([id]).encode("utf-8")

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def open_tokenizer(path: str | os.PathLike):
    """A tokenizer file (or a folder holding ``tokenizer.json``): Sparrow's C++ encoder when it implements the
    pipeline, else :class:`HFTokenizer` with one line on stderr saying why (encoding is slower). A file HF cannot
    read either raises the encoder's reason."""
    from .encoder import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        return Tokenizer.from_file(path)
    except ValueError as refused:
        try:
            tok = HFTokenizer(path)
        except Exception:  # HF cannot read it either: the encoder's reason is the one to show
            raise refused from None
        print(f"sparrow: {refused}; using HF tokenizers for it (encoding is slower)", file=sys.stderr)
        return tok
