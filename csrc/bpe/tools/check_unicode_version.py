#!/usr/bin/env python3
"""Which Unicode version do tiktoken's and HF tokenizers' regex engines classify code points by?

Development-time check behind gen_unicode_tables.py's choice of Unicode 16.0. For each class the
patterns use (\\p{L}, \\p{N}, \\p{Lu}, \\p{Lt}, \\p{Ll}, \\p{Lm}, \\p{Lo}, \\p{M}, \\s) it collects the members
of all 1.1M code points as each engine sees them and compares with a Unicode database:

* tiktoken: an Encoding whose pattern is just the class encodes only what the class matches, so
  decoding the encoding of the text of all code points gives the class's members.
* HF tokenizers (Oniguruma): a Split pre-tokenizer that removes runs of the complement leaves them.

    pip install tiktoken tokenizers unicodedata2==16.0.0
    python csrc/bpe/tools/check_unicode_version.py

Measured with tiktoken 0.14 and tokenizers 0.23: both agree with Unicode 16.0 on every class and
code point; Python 3.11's unicodedata (14.0) differs on ~9k letters, 17.0/18.0 on others.
"""

import sys
import unicodedata

WHITE_SPACE = {*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029,
               0x202F, 0x205F, 0x3000}
CLASSES = {"L": r"\p{L}", "N": r"\p{N}", "Lu": r"\p{Lu}", "Lt": r"\p{Lt}", "Ll": r"\p{Ll}", "Lm": r"\p{Lm}",
           "Lo": r"\p{Lo}", "M": r"\p{M}", "s": r"\s"}


def member(db, cp: int, cls: str) -> bool:
    if cls == "s":
        return cp in WHITE_SPACE
    cat = db.category(chr(cp))
    return cat[0] == cls if len(cls) == 1 else cat == cls


def main() -> int:
    import tiktoken
    from tokenizers import Regex, pre_tokenizers

    databases = {f"python {unicodedata.unidata_version}": unicodedata}
    try:
        import unicodedata2

        databases[f"unicodedata2 {unicodedata2.unidata_version}"] = unicodedata2
    except ImportError:
        print("(pip install unicodedata2==16.0.0 to compare with Unicode 16.0)")
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    text = "".join(map(chr, cps))
    ranks = {bytes([b]): b for b in range(256)}
    worst = 0
    for cls, pat in CLASSES.items():
        enc = tiktoken.Encoding(f"probe-{cls}", pat_str=pat, mergeable_ranks=ranks, special_tokens={})
        tk = set(enc.decode(enc.encode_ordinary(text)))
        complement = r"\S+" if cls == "s" else "[^" + pat + "]+"
        hf = set("".join(p for p, _ in pre_tokenizers.Split(Regex(complement), behavior="removed").pre_tokenize_str(text)))
        line = [f"{cls:3s} tiktoken-vs-hf {len(tk ^ hf):6d}"]
        for name, db in databases.items():
            ours = {chr(c) for c in cps if member(db, c, cls)}
            line.append(f"{name}: {len(ours ^ tk):6d}")
            worst = max(worst, len(ours ^ tk)) if "16.0" in name else worst
        print("  ".join(line))
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
