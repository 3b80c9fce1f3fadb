"""`sparrow data tokenize`: corpus -> <out>.bin + <out>.json (sparrow-tokens-v1)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

pytest.importorskip("sparrow._bpe")

from sparrow.tokenizer import EOT, Tokenizer, train_tokenizer  # noqa: E402
from sparrow.data.token_file import read_token_file  # noqa: E402
from sparrow.tokenizer.corpus import tokenize_corpus  # noqa: E402


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(["hello world, 你好世界. " * 20, "def f(x):\n    return x\n"] * 10, vocab_size=320, out_dir=out,
                    show_progress=False)
    return out


def test_tokenize_jsonl_and_text(tmp_path, tok_dir):
    docs = [f"document {i}: hello 世界 <|endoftext|> literal" for i in range(50)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("plain text file\nsecond line", encoding="utf-8")
    meta = tokenize_corpus([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], tmp_path / "out", tok_dir,
                           show_progress=False, batch_chars=300)
    tok = Tokenizer.from_file(tok_dir)
    expected = []
    for d in docs + ["plain text file\nsecond line"]:
        expected += tok.encode_ordinary(d) + [tok.eot_id]  # special-token text in documents is plain text
    tokens, meta2 = read_token_file(tmp_path / "out")
    assert meta == meta2
    assert meta["format"] == "sparrow-tokens-v1" and meta["dtype"] == "uint16" and meta["eot_id"] == 0
    assert meta["num_documents"] == 51 and meta["num_tokens"] == len(expected) == tokens.shape[0]
    assert meta["vocab_size"] == tok.vocab_size
    assert tokens.tolist() == expected
    raw = np.fromfile(tmp_path / "out.bin", dtype="<u2")
    assert raw.tolist() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.txt", "out.bin", "out.json"]  # no temp files
    from sparrow.data.token_file import TokenFile

    loaded = TokenFile(tmp_path / "out")
    assert len(loaded) == len(expected) and loaded.eot_id == 0 and loaded.tokens.tolist() == expected


def test_uint32_for_large_vocab_and_split_lines(tmp_path):
    ref = pytest.importorskip("sparrow.tokenizer.reference")
    if not ref.available("o200k"):
        pytest.skip("bpe-openai not installed")
    path = ref.tiktoken_file("o200k", tmp_path)
    (tmp_path / "c.txt").write_text("first line\nsecond line\n\nthird", encoding="utf-8")
    from sparrow.cli import data as data_cli

    parser = argparse.ArgumentParser()
    data_cli.register(parser.add_subparsers())
    args = parser.parse_args(["data", "tokenize", str(tmp_path / "c.txt"), "-t", str(path), "-o", str(tmp_path / "o"),
                              "--split-lines", "--no-progress", "--threads", "2"])
    assert args.func(args) == 0
    tokens, meta = read_token_file(tmp_path / "o")
    assert meta["dtype"] == "uint32" and tokens.dtype == np.dtype("<u4")
    tok = Tokenizer.from_file(path)
    assert meta["num_documents"] == 3  # empty lines are skipped
    expected = [i for line in ("first line", "second line", "third") for i in tok.encode_ordinary(line) + [199999]]
    assert tokens.tolist() == expected


def test_errors(tmp_path, tok_dir):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        tokenize_corpus([str(tmp_path / "bad.jsonl")], tmp_path / "out", tok_dir, show_progress=False)
    assert not list(tmp_path.glob("out*"))  # nothing half-written
    with pytest.raises(FileNotFoundError):
        tokenize_corpus([str(tmp_path / "missing.jsonl")], tmp_path / "out", tok_dir, show_progress=False)
    with pytest.raises(FileNotFoundError):
        read_token_file(tmp_path / "out")
    with pytest.raises(ValueError, match=EOT.replace("|", r"\|")):
        train_tokenizer(["abc"] * 5, vocab_size=300, out_dir=tmp_path / "noeot", special_tokens=["<pad>"],
                        show_progress=False)
        tokenize_corpus(["text"], tmp_path / "x", tmp_path / "noeot", show_progress=False)


def test_iterable_source(tmp_path, tok_dir):
    meta = tokenize_corpus(iter(["a b", "c"]), tmp_path / "it", tok_dir, show_progress=False)
    tokens, _ = read_token_file(tmp_path / "it.bin")
    assert meta["num_documents"] == 2 and tokens[-1] == 0 and meta["source"] == "<iterable>"
    meta = tokenize_corpus(iter([]), tmp_path / "empty", tok_dir, show_progress=False)
    tokens, _ = read_token_file(tmp_path / "empty")
    assert meta["num_tokens"] == meta["num_documents"] == 0 and tokens.shape == (0,)
