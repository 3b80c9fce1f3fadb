"""Corpus cleaning as composable steps, the way the Chinese small-LLM projects prepare pretraining text.

A step is a callable ``text -> text | None``: it returns the (possibly rewritten) text, or ``None`` to drop the
document. :class:`Cleaner` runs steps in order and counts, per step, how many documents it dropped and how many it
changed, which is what ``sparrow data clean`` reports. Normalising steps come before the deduplicating ones so
that documents differing only in width forms, invisible characters or spacing hash the same.

Stateful steps (:class:`ExactDedup`, :class:`NearDedup`) remember what they have seen, so one instance cleans
one corpus.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

Step = Callable[[str], "str | None"]


# --------------------------------------------------------------------------------------- normalising steps

# Full-width punctuation that is the standard form in Chinese text. NFKC would turn "，" into "," and "（" into "(",
# mixing two punctuation systems in Chinese prose; these are shielded in private-use code points (which NFKC
# leaves alone) and restored afterwards.
_KEEP_FULLWIDTH = "，！？：；（）"
_SHIELD = {ord(c): chr(0xF0000 + i) for i, c in enumerate(_KEEP_FULLWIDTH)}
_UNSHIELD = {ord(v): k for k, v in ((chr(k), v) for k, v in _SHIELD.items())}


def nfkc(text: str) -> str:
    """Unicode NFKC: full-width letters and digits (ＡＢＣ１２３), ligatures and other compatibility forms become
    their plain form; Chinese punctuation (，。！？：；（）) is kept."""
    return unicodedata.normalize("NFKC", text.translate(_SHIELD)).translate(_UNSHIELD)


# Zero-width and direction marks are invisible but split tokens and defeat dedup; U+FEFF is the BOM.
_INVISIBLE = "\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff\u00ad\u202a\u202b\u202c\u202d\u202e"
_INVISIBLE_TABLE = {ord(c): None for c in _INVISIBLE}


def remove_control(text: str) -> str:
    """Drop control characters (Unicode category Cc, except newline and tab), format characters that are invisible
    (zero-width spaces and joiners, direction marks, the BOM, soft hyphens) and unassigned/private-use code points."""
    text = text.translate(_INVISIBLE_TABLE)
    if text.isprintable():  # the common case: nothing to scan character by character
        return text
    return "".join(c for c in text if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf", "Co", "Cn", "Cs"))


# Three or more of the same punctuation mark ("。。。。。", "!!!!!", "，，，") collapse to one. Two are kept
# because "……" (a Chinese ellipsis is two U+2026) and "——" (a dash) are single marks typed twice.
_REPEATED_PUNCT = re.compile(r"([!-/:-@\[-`{-~\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\u2010-\u2027])\1{2,}")


def collapse_punctuation(text: str) -> str:
    return _REPEATED_PUNCT.sub(r"\1", text)


_SPACES = re.compile(r"[^\S\n]+")  # whitespace other than newlines (includes the ideographic space U+3000)
_BLANK_LINES = re.compile(r"\n\s*\n\s*(\n\s*)+")
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef"
_SPACE_BETWEEN_CJK = re.compile(rf"(?<=[{_CJK}]) (?=[{_CJK}])")


def normalize_whitespace(text: str) -> str:
    """Runs of spaces and tabs become one space, a space between two CJK characters is removed (an artefact of
    PDF and web extraction; Chinese does not separate words), three or more newlines become a paragraph break
    (two), and each line is stripped."""
    text = _SPACES.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _SPACE_BETWEEN_CJK.sub("", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


class TraditionalToSimplified:
    """Traditional -> Simplified Chinese with OpenCC (``pip install opencc``; the ``sparrow-llm[data]`` extra).
    The Chinese roots train on simplified text; mixed scripts split the vocabulary between two forms of each word."""

    def __init__(self, config: str = "t2s"):
        try:
            import opencc
        except ImportError as exc:
            raise ImportError("traditional->simplified conversion needs OpenCC: pip install opencc "
                              "(or pip install 'sparrow-llm[data]')") from exc
        self._converter = opencc.OpenCC(config)

    def __call__(self, text: str) -> str:
        return self._converter.convert(text)


# ------------------------------------------------------------------------------------------ filtering steps

@dataclass
class LengthFilter:
    """Keep documents with ``min_chars <= len(text) <= max_chars`` (``max_chars=None``: no upper bound)."""

    min_chars: int = 1
    max_chars: int | None = None

    def __call__(self, text: str) -> str | None:
        if len(text) < self.min_chars or (self.max_chars is not None and len(text) > self.max_chars):
            return None
        return text


_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


def script_fractions(text: str) -> dict[str, float]:
    """Fraction of letters that are Han ("zh") and Latin ("en"), by script. A heuristic, not a language model:
    it separates the two languages a bilingual corpus mixes and rejects text that is mostly neither (code
    dumps, other scripts, symbol soup), which is what a pretraining filter needs here."""
    han = len(_HAN.findall(text))
    latin = len(_LATIN.findall(text))
    letters = sum(1 for c in text if c.isalpha())
    if letters == 0:
        return {"zh": 0.0, "en": 0.0}
    return {"zh": han / letters, "en": latin / letters}


@dataclass
class LanguageFilter:
    """Keep documents whose letters are at least ``min_fraction`` in one of ``languages`` ("zh", "en"), by script."""

    languages: Sequence[str] = ("zh", "en")
    min_fraction: float = 0.5

    def __post_init__(self) -> None:
        unknown = sorted(set(self.languages) - {"zh", "en"})
        if unknown:
            raise ValueError(f"languages: unknown {unknown}; supported are ['en', 'zh']")

    def __call__(self, text: str) -> str | None:
        fractions = script_fractions(text)
        return text if any(fractions[lang] >= self.min_fraction for lang in self.languages) else None


class ExactDedup:
    """Drop documents whose exact text was seen before (BLAKE2b digest, 16 bytes per document kept)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def __call__(self, text: str) -> str | None:
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in self._seen:
            return None
        self._seen.add(digest)
        return text


class NearDedup:
    """Drop documents whose estimated Jaccard similarity to a kept one reaches ``threshold``, with MinHash and
    LSH banding (``datasketch``; the ``sparrow-llm[data]`` extra).

    Shingles are character n-grams of the text with whitespace removed, which works for Chinese (no word
    boundaries) and English alike. Documents shorter than ``ngram`` characters are left to exact dedup.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError as exc:
            raise ImportError(f"near-duplicate removal needs datasketch: {NEAR_DEDUP_INSTALL}") from exc
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold: must be in (0, 1], got {threshold}")
        self._minhash = MinHash
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        self._count = 0

    def signature(self, text: str):
        compact = "".join(text.split())
        shingles = {compact[i : i + self.ngram] for i in range(len(compact) - self.ngram + 1)}
        m = self._minhash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch([s.encode("utf-8") for s in shingles])
        return m

    def __call__(self, text: str) -> str | None:
        if len("".join(text.split())) < self.ngram:
            return text
        m = self.signature(text)
        if self._lsh.query(m):
            return None
        self._lsh.insert(str(self._count), m)
        self._count += 1
        return text


# ------------------------------------------------------------------------------------------------ pipeline

@dataclass
class StepStats:
    name: str
    seen: int = 0
    removed: int = 0
    changed: int = 0


@dataclass
class Cleaner:
    """Runs ``steps`` (``(name, step)`` pairs) over documents and counts what each did."""

    steps: list[tuple[str, Step]]
    stats: list[StepStats] = field(init=False)
    documents_in: int = field(init=False, default=0)
    documents_out: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.stats = [StepStats(name) for name, _ in self.steps]

    def clean(self, text: str) -> str | None:
        self.documents_in += 1
        for (_, step), stats in zip(self.steps, self.stats):
            stats.seen += 1
            result = step(text)
            if result is None:
                stats.removed += 1
                return None
            if result != text:
                stats.changed += 1
            text = result
        self.documents_out += 1
        return text

    def __call__(self, texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            cleaned = self.clean(text)
            if cleaned is not None:
                yield cleaned

    def report(self) -> str:
        width = max([len(s.name) for s in self.stats] + [4])
        lines = [f"{'step':<{width}}  {'seen':>9}  {'removed':>9}  {'changed':>9}"]
        for s in self.stats:
            lines.append(f"{s.name:<{width}}  {s.seen:>9}  {s.removed:>9}  {s.changed:>9}")
        lines.append(f"{self.documents_in} documents in, {self.documents_out} out")
        return "\n".join(lines)


NEAR_DEDUP_INSTALL = "pip install datasketch (or pip install 'sparrow-llm[data]')"


def near_dedup_available() -> bool:
    """Whether :class:`NearDedup` can run here: it needs ``datasketch``, an optional dependency (the ``data``
    extra), because a plain install only needs it for corpora large enough to hold near-duplicates."""
    try:
        import datasketch  # noqa: F401
    except ImportError:
        return False
    return True


def default_steps(*, t2s: bool = False, min_chars: int = 10, max_chars: int | None = None,
                  languages: Sequence[str] | None = ("zh", "en"), min_language_fraction: float = 0.5,
                  exact_dedup: bool = True, near_dedup: bool = True, near_threshold: float = 0.8,
                  ) -> list[tuple[str, Step]]:
    """The usual order: normalise (so variants compare equal), then filter, then deduplicate (the costliest,
    run on what survives)."""
    steps: list[tuple[str, Step]] = [
        ("nfkc", nfkc),
        ("remove_control", remove_control),
        ("collapse_punctuation", collapse_punctuation),
        ("normalize_whitespace", normalize_whitespace),
    ]
    if t2s:
        steps.append(("t2s", TraditionalToSimplified()))
    steps.append(("length", LengthFilter(min_chars, max_chars)))
    if languages:
        steps.append(("language", LanguageFilter(tuple(languages), min_language_fraction)))
    if exact_dedup:
        steps.append(("exact_dedup", ExactDedup()))
    if near_dedup:
        steps.append(("near_dedup", NearDedup(near_threshold)))
    return steps
