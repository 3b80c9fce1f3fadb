"""tokenizer.json pipelines of popular open models' byte-level BPE tokenizers, byte-exact with HF tokenizers.

No hub is reachable, so each family's layout is rebuilt here with HF ``tokenizers`` (the pre-tokenizer and
normalizer exactly as the family's tokenizer.json has them, a small vocabulary trained on local text) and
Sparrow's ids are compared with HF's on edge cases, real text and hypothesis-generated text. Layouts Sparrow
does not implement must be refused by name at load time, never encoded differently.
"""

from __future__ import annotations

import json

import pytest

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from sparrow.tokenizer import Tokenizer  # noqa: E402
from test_tokenizer_encoder import BULK_PARTS, EDGE_CASES, TEXT, assert_pretokenizer_matches_regex, corpus_samples  # noqa: E402

from sparrow.tokenizer.reference import DEEPSEEK_V3_SPLITS as DEEPSEEK_V3  # noqa: E402
from sparrow.tokenizer.reference import LLAMA3_SPLIT as LLAMA3  # noqa: E402
from sparrow.tokenizer.reference import O200K_SPLIT as O200K  # noqa: E402
from sparrow.tokenizer.reference import QWEN2_SPLIT as QWEN2  # noqa: E402
from sparrow.tokenizer.reference import hf_layout_pre_tokenizer as split_then_bytes  # noqa: E402


def deepseek_v3(splits=DEEPSEEK_V3):
    return split_then_bytes(splits)


# family -> (pre_tokenizer, normalizer, ignore_merges, added tokens as (content, special))
LAYOUTS = {
    "llama3": (lambda: split_then_bytes(LLAMA3), None, True,
               [("<|begin_of_text|>", True), ("<|eot_id|>", True), ("<|start_header_id|>", True)]),
    "qwen2": (lambda: split_then_bytes(QWEN2), lambda: normalizers.NFC(), False,
              [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<think>", False)]),
    "gpt-oss": (lambda: split_then_bytes(O200K), None, True, [("<|start|>", True), ("<|end|>", True)]),
    "mistral-nemo-like": (lambda: split_then_bytes(O200K), None, False, [("<s>", True), ("[INST]", True)]),
    "gpt2": (lambda: pre_tokenizers.ByteLevel(add_prefix_space=False), None, False, [("<|endoftext|>", True)]),
    "nfkc-llama3": (lambda: split_then_bytes(LLAMA3), lambda: normalizers.NFKC(), False, [("<|eot_id|>", True)]),
    # Digits before the split: one token per digit (individual_digits=True) in front of GPT-2's ByteLevel
    # regex, as a tokenizer for arithmetic would have it; digit runs in front of Llama-3's Split.
    "deepseek-v3": (deepseek_v3, None, False,
                    [("<｜begin▁of▁sentence｜>", True), ("<｜end▁of▁sentence｜>", True), ("<think>", False)]),
    "digits-gpt2": (lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)]),
                    None, False, [("<|endoftext|>", True)]),
    "digit-runs-llama3": (lambda: pre_tokenizers.Sequence([
                              pre_tokenizers.Digits(individual_digits=False),
                              pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                          None, False, [("<|eot_id|>", True)]),
}


def training_text() -> list[str]:
    from pydoc_data.topics import topics

    from sparrow.data.builtin_corpus import generated_documents

    return [t for _, t in sorted(topics.items())][:120] + generated_documents(1)[:1500]


def build(family: str, path):
    pre, norm, ignore_merges, added = LAYOUTS[family]
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if norm:
        tok.normalizer = norm()
    tok.pre_tokenizer = pre()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=3000, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[a for a, special in added if special])
    tok.train_from_iterator(training_text(), trainer)
    tok.add_tokens([AddedToken(a, special=False, normalized=True) for a, special in added if not special])
    file = path / f"{family}.json"
    tok.save(str(file))
    return tok, Tokenizer.from_file(file)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def pair(request, tmp_path_factory):
    return request.param, *build(request.param, tmp_path_factory.mktemp("layouts"))


def hf_ids(hf, text):
    return hf.encode(text, add_special_tokens=False).ids


def sparrow_ids(tok, text):
    return tok.encode(text, allowed_special="all")


def test_layout_loads_with_its_pattern(pair):
    family, hf, tok = pair
    expected = {"llama3": "llama3", "qwen2": "qwen2", "gpt-oss": "o200k", "mistral-nemo-like": "o200k",
                "gpt2": "gpt2", "nfkc-llama3": "llama3", "deepseek-v3": "deepseek_v3", "digits-gpt2": "gpt2",
                "digit-runs-llama3": "llama3"}[family]
    assert tok.pattern == expected
    assert tok.digit_split == {"digits-gpt2": "individual", "digit-runs-llama3": "runs"}.get(family, "")


def test_edge_cases_match_hf(pair):
    family, hf, tok = pair
    extra = ["Ünïcödé ﬁ ①②③ Å Å", "e\u0301 vs é", "<|im_start|>user\nhi<|im_end|>", "x<think>y", "1234567 89",
             "Hello <|eot_id|> there\n\n", "  \n  ", "a\r\n\r\n b", "a  1", "x 12 y  345\n6", "١٢٣ ½⅓ Ⅻ ²",
             "3.14159+2=5.14159", "  7"]
    for text in EDGE_CASES + extra:
        assert sparrow_ids(tok, text) == hf_ids(hf, text), (family, text)


def test_real_text_matches_hf(pair):
    family, hf, tok = pair
    for text in corpus_samples():
        assert tok.encode_ordinary(text) == hf_ids(hf, text)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_random_text_matches_hf(pair, text):
    family, hf, tok = pair
    try:
        ids = sparrow_ids(tok, text)
    except ValueError as exc:
        # Only refusal Sparrow may make: non-normalized text around added tokens, naming the normalizer.
        assert "normalizer" in str(exc) and tok._normalizer
        return
    assert ids == hf_ids(hf, text), (family, text)


def test_batch_and_documents_match_single(pair):
    family, hf, tok = pair
    texts = ["e\u0301t\u00e9 ﬁ", "plain", "中文 123456"]
    assert tok.encode_ordinary_batch(texts, num_threads=2) == [hf_ids(hf, t) for t in texts]
    assert list(tok.encode_documents(texts)) == [i for t in texts for i in hf_ids(hf, t)]


# ---- refused by name -----------------------------------------------------------------------------------

def refusal(tmp_path, pre=None, norm=None, ignore_merges=False):
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre
    if norm is not None:
        tok.normalizer = norm
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world 123"] * 10, trainer)
    file = tmp_path / "t.json"
    tok.save(str(file))
    with pytest.raises(ValueError) as info:
        Tokenizer.from_file(file)
    return str(info.value)


def test_deepseek_v3_variants_refused_by_name(tmp_path):
    # One character changed in the third Split, or the Splits reordered: not DeepSeek-V3's layout.
    assert "Sequence layout" in refusal(tmp_path, deepseek_v3([*DEEPSEEK_V3[:2], DEEPSEEK_V3[2].replace("[A-Za-z]+", "[A-Za-z]*")]))
    assert "Sequence layout" in refusal(tmp_path, deepseek_v3(list(DEEPSEEK_V3[::-1])))


def test_unknown_split_regex_refused_by_name(tmp_path):
    assert "Split regex" in refusal(tmp_path, split_then_bytes(r"\w+|\s+|[^\w\s]+"))


def test_other_components_refused_by_name(tmp_path):
    digits_after = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
                                            pre_tokenizers.Digits(individual_digits=True),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert "Digits only as its first step" in refusal(tmp_path, digits_after)
    assert "Punctuation" in refusal(tmp_path, pre_tokenizers.Sequence([pre_tokenizers.Punctuation(),
                                                                       pre_tokenizers.ByteLevel()]))
    assert "Lowercase" in refusal(tmp_path, pre_tokenizers.ByteLevel(add_prefix_space=False), normalizers.Lowercase())
    merged = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), behavior="merged_with_previous"),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert "behavior" in refusal(tmp_path, merged)
    assert "add_prefix_space" in refusal(tmp_path, pre_tokenizers.ByteLevel(add_prefix_space=True))


def test_added_token_strip_flags_refused_by_name(tmp_path):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    file = tmp_path / "t.json"
    tok.save(str(file))
    data = json.loads(file.read_text())
    assert any(a["lstrip"] for a in data["added_tokens"])
    with pytest.raises(ValueError, match="lstrip"):
        Tokenizer.from_file(file)


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
@settings(max_examples=200, deadline=None)
@given(text=TEXT)
def test_family_pretokenizers_match_their_regex(name, text):
    # Text with code points Python's Unicode 14 leaves unassigned is passed over there; the HF comparisons
    # above cover it.
    assert_pretokenizer_matches_regex(name, text)


DEEPSEEK_CHARS = st.sampled_from(list("aZé \n\r\t.,'(\"-_1239#$") + [
    "你", "カ", "・", "゛", "\u3099", "\u0301", "\u200d", "\x00", "½", "😀", "\u00a0", "\u3000", "ー", "。", "Ω", "€", "゠"])


def assert_deepseek_v3_matches_hf(text):
    from sparrow import _bpe

    splits = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), behavior="isolated") for r in DEEPSEEK_V3])
    assert _bpe.pretokenize(text, "deepseek_v3") == [p for p, _ in splits.pre_tokenize_str(text)]


@settings(max_examples=400, deadline=None)
@given(text=st.one_of(TEXT, st.lists(DEEPSEEK_CHARS, max_size=16).map("".join)))
def test_deepseek_v3_pretokenizer_matches_hf(text):
    """The one-pass DeepSeek-V3 splitter gives the pieces of HF's three Splits in sequence, CJK-range runs
    holding punctuation (・, ゠) and marks (゛) included."""
    assert_deepseek_v3_matches_hf(text)


@settings(max_examples=400, deadline=None)
@given(text=st.lists(st.sampled_from(BULK_PARTS + ["(x", "_ab", "\x01b", " \x01b", "\x01\x01", "  1", "\n  1", "\t(b",
                                                   ".(b", "(\n(b", "x\x7f"]),
                     min_size=1, max_size=150).map("".join))
def test_deepseek_v3_bulk_scan_matches_hf(text):
    """Long texts of the classes DeepSeek-V3's bulk scan tells apart (windows of 64 bytes at every offset):
    controls as prefixes and as unmatched text, punctuation taking the letters after it, whitespace
    before a digit."""
    assert_deepseek_v3_matches_hf(text)
