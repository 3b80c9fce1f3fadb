"""``Tokenizer``: the Python face of the C++ encoder (``sparrow._bpe``)."""

from __future__ import annotations

import base64
import gzip
import os
from pathlib import Path
from typing import AbstractSet, Collection, Iterable, Literal, Sequence

# Built-in split patterns (hand-written in csrc/bpe/pretokenize.cpp, byte-exact with these regexes).
PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
    "o200k": "|".join([
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]),
    # The Split regexes of Llama-3's and Qwen2/3's tokenizer.json (tests/test_tokenizer_layouts.py).
    "llama3": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}

# Special tokens of OpenAI's rank files, used when a .tiktoken file is loaded by its usual name.
_KNOWN_TIKTOKEN = {
    "r50k_base": ("gpt2", {"<|endoftext|>": 50256}),
    "p50k_base": ("gpt2", {"<|endoftext|>": 50256}),
    "cl100k_base": ("cl100k", {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                               "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}),
    "o200k_base": ("o200k", {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
}


def _native():
    try:
        from sparrow import _bpe
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise ImportError(
            "sparrow._bpe (the C++ BPE encoder) is not built; run `pip install --no-build-isolation -e .`"
        ) from exc
    return _bpe


def _read(path: str | os.PathLike) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    data = p.read_bytes()
    if p.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{p}: not a valid gzip file: {exc}") from exc
    return data


class Tokenizer:
    """A byte-level BPE tokenizer run by the C++ encoder.

    ``encode`` follows tiktoken's conventions for special tokens: ``allowed_special`` ("all" or a set) are
    split out of the text (leftmost-longest, as HF does) and encoded as their ids; any other special token
    found in the text raises ``ValueError`` unless ``disallowed_special=()``, in which case it is encoded
    as ordinary text. Non-special added tokens of a tokenizer.json are always split out, as HF does.
    """

    def __init__(self, native, name: str = "", source: tuple | None = None):
        self._enc = native
        self.name = name
        self._source = source  # how to rebuild it in another process (pickling)
        specials = native.special_tokens
        self._special_index = {text: k for k, (text, _id, special) in enumerate(specials) if special}
        self._n_added = len(specials)
        self.special_tokens: dict[str, int] = {text: id_ for text, id_, special in specials if special}
        self._all = [True] * self._n_added
        self._none = [False] * self._n_added
        # tokenizer.json's normalizer ("" or "NFC", e.g. Qwen2/3), applied here before the C++ encoder.
        self._normalizer = native.normalizer
        self._added_texts = [text for text, _id, _special in specials]
        if not self._normalizer:
            # Without a normalizer the native method is all of encode_ordinary: the instance calls it
            # directly, ~100 ns a call less (thousands of calls when each document is its own call).
            self.encode_ordinary = native.encode_ordinary

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """A ``tokenizer.json`` (byte-level BPE), a directory holding one, or a ``.tiktoken`` rank file with
        one of OpenAI's names (r50k_base, p50k_base, cl100k_base, o200k_base; optionally ``.gz``)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        name = p.name
        for suffix in (".gz", ".tiktoken"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        if p.name.endswith((".tiktoken", ".tiktoken.gz")):
            if name not in _KNOWN_TIKTOKEN:
                raise ValueError(f"{p}: unknown rank file name; use Tokenizer.from_tiktoken(path, pattern=..., "
                                 f"special_tokens=...) (known: {sorted(_KNOWN_TIKTOKEN)})")
            pattern, specials = _KNOWN_TIKTOKEN[name]
            return cls.from_tiktoken(p, pattern=pattern, special_tokens=specials)
        data = _read(p)
        bpe = _native()
        try:
            native = bpe.Encoder.from_hf_json(data)
        except bpe.FormatError as exc:
            raise ValueError(f"{p}: {exc}") from None
        return cls(native, name=str(p), source=("file", str(p)))

    @classmethod
    def from_tiktoken(cls, path: str | os.PathLike, pattern: str = "cl100k",
                      special_tokens: dict[str, int] | None = None) -> "Tokenizer":
        """A tiktoken rank file (``base64 rank`` lines, optionally gzipped) with a built-in split pattern:
        "gpt2" (r50k/p50k), "cl100k" or "o200k"."""
        bpe = _native()
        pattern = bpe.pattern_name(pattern)  # ValueError for unknown names, before reading the file
        data = _read(path)
        try:
            native = bpe.Encoder.from_tiktoken(data, pattern, dict(special_tokens or {}))
        except bpe.FormatError as exc:
            raise ValueError(f"{path}: {exc}") from None
        return cls(native, name=str(path), source=("tiktoken", str(path), pattern, dict(special_tokens or {})))

    @classmethod
    def from_ranks(cls, mergeable_ranks: dict[bytes, int], pattern: str = "cl100k",
                   special_tokens: dict[str, int] | None = None, name: str = "") -> "Tokenizer":
        """From tiktoken-style ``mergeable_ranks`` (e.g. ``tiktoken.Encoding._mergeable_ranks``)."""
        bpe = _native()
        pattern = bpe.pattern_name(pattern)
        data = "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in mergeable_ranks.items())
        try:
            native = bpe.Encoder.from_tiktoken(data.encode(), pattern, dict(special_tokens or {}))
        except bpe.FormatError as exc:
            raise ValueError(str(exc)) from None
        return cls(native, name=name, source=("ranks", dict(mergeable_ranks), pattern, dict(special_tokens or {}), name))

    def __reduce__(self):
        # Pickled as the recipe, not the tables: DataLoader workers and multiprocessing pools rebuild it.
        kind, *args = self._source
        if kind == "file":
            return (Tokenizer.from_file, tuple(args))
        if kind == "tiktoken":
            return (_from_tiktoken_kw, tuple(args))
        return (_from_ranks_kw, tuple(args))

    # ---- encoding -----------------------------------------------------------------------------------
    def _normalize(self, text: str) -> str:
        """The text HF tokenizers would pre-tokenize, for tokenizers with a normalizer. HF normalizes the
        text between added tokens; with no added token in the text (before or after normalizing) that is
        the whole text, the only case handled here; otherwise ``ValueError`` names the normalizer rather
        than giving other ids. Unicode tables: ``unicodedata2`` when installed, else the stdlib's."""
        if not self._normalizer or text.isascii():
            return text
        ud = _unicodedata()
        # unicodedata2 (16.0.0) has no is_normalized: the quick check only where the module has it.
        if getattr(ud, "is_normalized", None) and ud.is_normalized(self._normalizer, text):
            return text
        normalized = ud.normalize(self._normalizer, text)
        if normalized == text:
            return text
        if any(t in text or t in normalized for t in self._added_texts):
            raise ValueError(f"{self.name}: text that is not in {self._normalizer} form and contains added tokens: "
                             f"the tokenizer's {self._normalizer} normalizer is not supported there")
        return normalized

    def _mask(self, allowed_special, disallowed_special) -> tuple[list[bool], bool]:
        if allowed_special == "all":
            mask = self._all
        elif not allowed_special:
            mask = self._none
        else:
            mask = list(self._none)
            for token in allowed_special:
                k = self._special_index.get(token)
                if k is None:
                    raise ValueError(f"{token!r} is not a special token of this tokenizer")
                mask[k] = True
        if disallowed_special == "all":
            check = True
        elif not disallowed_special:
            check = False
        else:
            unknown = set(disallowed_special) - set(self._special_index)
            if unknown:
                raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)}")
            check = False  # an explicit subset is checked in Python (_check_subset), a rare path
        return mask, check

    def _check_subset(self, text: str, allowed_special, disallowed_special) -> None:
        if disallowed_special in ("all", (), None) or not disallowed_special:
            return
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special or ())
        for token in disallowed_special:
            if token not in allowed and token in text:
                raise ValueError(f"text contains the disallowed special token {token}")

    def encode(self, text: str, *, allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        """Token ids of ``text``. See the class docstring for special tokens; raises ``ValueError`` for a
        disallowed special token and ``UnicodeEncodeError`` for strings with lone surrogates."""
        mask, check = self._mask(allowed_special, disallowed_special)
        self._check_subset(text, allowed_special, disallowed_special)
        return self._enc.encode(self._normalize(text), mask, check)

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of ``text`` with special-token text encoded as ordinary text (never raises for it)."""
        return self._enc.encode_ordinary(self._normalize(text) if self._normalizer else text)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None, *,
                     allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
                     disallowed_special: Literal["all"] | Collection[str] = "all") -> list[list[int]]:
        """``encode`` over many texts on a C++ thread pool (the GIL is released); ``num_threads`` defaults
        to the number of cores."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of str, not a str")
        mask, check = self._mask(allowed_special, disallowed_special)
        if disallowed_special != "all" and disallowed_special:
            for text in texts:
                self._check_subset(text, allowed_special, disallowed_special)
        if self._normalizer:
            texts = [self._normalize(t) for t in texts]
        return self._enc.encode_batch(texts, mask, check, False, num_threads)

    def encode_ordinary_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_ordinary_batch takes a sequence of str, not a str")
        if self._normalizer:
            texts = [self._normalize(t) for t in texts]
        return self._enc.encode_batch(texts, [], False, True, num_threads)

    def encode_documents(self, texts: Sequence[str], separator: int | None = None, num_threads: int | None = None):
        """Ordinary encodings of ``texts`` concatenated, each followed by ``separator`` when given, as a numpy
        uint32 array (the corpus writer's fast path: no Python int per token)."""
        if self._normalizer:
            texts = [self._normalize(t) for t in texts]
        return self._enc.encode_documents(texts, -1 if separator is None else int(separator), num_threads)

    # ---- decoding and vocabulary --------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids``; ``IndexError`` for ids that are not in the vocabulary."""
        return self._enc.decode_bytes(ids)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """The text of ``ids``; invalid UTF-8 (a character cut between tokens) is replaced with U+FFFD."""
        return self._enc.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_bytes_batch(self, batch: Sequence[Iterable[int]], *, num_threads: int | None = None) -> list[bytes]:
        """The bytes of each id sequence, decoded on up to ``num_threads`` threads (default: one per core)
        without the GIL."""
        return self._enc.decode_bytes_batch(batch, num_threads)

    def decode_batch(self, batch: Sequence[Iterable[int]], *, errors: str = "replace",
                     num_threads: int | None = None) -> list[str]:
        """``decode`` of each id sequence (tiktoken's ``decode_batch``), the bytes decoded in parallel."""
        return [b.decode("utf-8", errors=errors) for b in self.decode_bytes_batch(batch, num_threads=num_threads)]

    @property
    def vocab_size(self) -> int:
        """Largest id + 1, special tokens included."""
        return self._enc.vocab_size

    @property
    def eot_id(self) -> int | None:
        return self.special_tokens.get("<|endoftext|>")

    @property
    def pattern(self) -> str:
        return self._enc.pattern

    @property
    def digit_split(self) -> str:
        """The tokenizer.json's Digits pre-tokenizer, applied before the pattern: "" (none), "runs"
        (individual_digits=false) or "individual" (individual_digits=true)."""
        return self._enc.digit_split

    def token_to_id(self, token: str | bytes) -> int | None:
        """The id of a token given by its text (str) or raw bytes, or None. (For HF-style byte-level
        strings such as "Ġthe", pass the raw text " the".)"""
        if isinstance(token, str):
            token = token.encode("utf-8")
        return self._enc.token_to_id(token)

    def id_to_token(self, id: int) -> bytes:
        """The raw bytes of token ``id`` (``IndexError`` when there is none)."""
        return self._enc.id_to_token(id)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, pattern={self.pattern!r})"


def _unicodedata():
    try:
        import unicodedata2 as ud  # the Unicode version HF tokenizers uses, when installed
    except ImportError:
        import unicodedata as ud
    return ud


def _from_tiktoken_kw(path, pattern, special_tokens):
    return Tokenizer.from_tiktoken(path, pattern=pattern, special_tokens=special_tokens)


def _from_ranks_kw(ranks, pattern, special_tokens, name):
    return Tokenizer.from_ranks(ranks, pattern=pattern, special_tokens=special_tokens, name=name)
