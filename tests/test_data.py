"""sparrow.data: cleaning steps and their counts, loading through datasets, the built-in corpus, packing."""

import argparse
import json
import re

import numpy as np
import pytest
import torch

from sparrow import SparrowConfig, SparrowForCausalLM
from sparrow.data import builtin_corpus, cleaning
from sparrow.data.loading import iter_texts
from sparrow.data.packing import IGNORE_INDEX, PackedDataset, count_targets, pack_rows
from sparrow.data.token_file import TokenFile, write_token_file


# ------------------------------------------------------------------------------------------------- cleaning

def test_normalising_steps():
    assert cleaning.nfkc("ＡＢＣ１２３ ﬁ") == "ABC123 fi"
    assert cleaning.nfkc("你好，世界！（真的？）") == "你好，世界！（真的？）"  # Chinese punctuation is kept
    assert cleaning.remove_control("a\u200bb\u200dc\ufeffd\x00e\x07f\ng\th") == "abcdef\ng\th"
    assert cleaning.collapse_punctuation("好。。。。。真的！！！！吗??? 对……——") == "好。真的！吗? 对……——"
    assert cleaning.normalize_whitespace("  a  \t b \r\n\n\n\nc 中 文 字 d  ") == "a b\n\nc 中文字 d"


def test_traditional_to_simplified():
    pytest.importorskip("opencc")
    assert cleaning.TraditionalToSimplified()("漢字轉換，開放中文") == "汉字转换，开放中文"


def test_filters():
    assert cleaning.LengthFilter(3, 5)("ab") is None
    assert cleaning.LengthFilter(3, 5)("abcd") == "abcd"
    assert cleaning.LengthFilter(3, 5)("abcdef") is None
    keep = cleaning.LanguageFilter(("zh", "en"), 0.5)
    assert keep("这是一个中文句子。") and keep("An English sentence.")
    assert keep("Это русское предложение.") is None
    assert keep("12345 +-*/ ==== !!!") is None
    assert cleaning.LanguageFilter(("zh",), 0.5)("An English sentence.") is None
    with pytest.raises(ValueError, match="languages"):
        cleaning.LanguageFilter(("fr",))


def test_exact_and_near_dedup():
    exact = cleaning.ExactDedup()
    assert exact("same text") == "same text" and exact("same text") is None and exact("other") == "other"
    pytest.importorskip("datasketch")
    near = cleaning.NearDedup(threshold=0.7)
    base = "The quick brown fox jumps over the lazy dog near the river bank every single morning. " * 3
    assert near(base) == base
    assert near(base.replace("lazy", "sleepy")) is None  # one word changed
    different = "Completely unrelated content about compilers, register allocation and instruction scheduling."
    assert near(different) == different
    zh = "小明每天早上六点起床，先跑步半小时，然后吃早饭，七点半坐公交车去学校上课。" * 2
    assert near(zh) == zh and near(zh.replace("六点", "五点")) is None


def test_cleaner_counts_what_each_step_did():
    pytest.importorskip("datasketch")
    docs = ["Ｈｅｌｌｏ world, this is fine text!!!!!", "Hello world, this is fine text!",
            "short", "Это русский текст, довольно длинный.", "这是一段中文文本，内容足够长。",
            "这是一段中文文本，内容足够长。"]
    cleaner = cleaning.Cleaner(cleaning.default_steps(min_chars=10))
    out = list(cleaner(docs))
    assert out == ["Hello world, this is fine text!", "这是一段中文文本，内容足够长。"]
    stats = {s.name: s for s in cleaner.stats}
    assert stats["nfkc"].changed == 1 and stats["collapse_punctuation"].changed == 1
    assert stats["length"].removed == 1 and stats["language"].removed == 1
    assert stats["exact_dedup"].removed == 2 and stats["near_dedup"].removed == 0
    assert cleaner.documents_in == 6 and cleaner.documents_out == 2
    assert "exact_dedup" in cleaner.report()


def _data_cli(argv):
    from sparrow.cli import data as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_clean_command(tmp_path, capsys):
    pytest.importorskip("datasketch")
    src = tmp_path / "in.jsonl"
    rows = [{"content": "第一篇文章。。。。。内容足够长了。"}, {"content": "第一篇文章。内容足够长了。"},
            {"content": "An English document that is long enough."}]
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert _data_cli(["data", "clean", str(src), str(tmp_path / "out.jsonl"), "--field", "content"]) == 0
    out = [json.loads(line)["text"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out == ["第一篇文章。内容足够长了。", "An English document that is long enough."]
    report = capsys.readouterr().out
    assert re.search(r"exact_dedup\s+3\s+1\s+0", report) and "3 documents in, 2 out" in report


def test_clean_without_datasketch_skips_near_dedup_with_a_notice(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cleaning, "near_dedup_available", lambda: False)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "An English document that is long enough."}) + "\n")
    assert _data_cli(["data", "clean", str(src), str(tmp_path / "out.jsonl")]) == 0
    captured = capsys.readouterr()
    notice = [line for line in captured.err.splitlines() if "near-duplicate" in line]
    assert len(notice) == 1 and "pip install datasketch" in notice[0]
    assert "near_dedup" not in captured.out and "1 documents in, 1 out" in captured.out


def test_clean_command_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        _data_cli(["data", "clean", str(tmp_path / "missing.jsonl"), str(tmp_path / "out.jsonl")])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        _data_cli(["data", "clean", str(empty), str(tmp_path / "out.jsonl"), "--no-near-dedup"])


# -------------------------------------------------------------------------------------------------- loading

def test_loading_local_formats(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("para one\nstill one\n\npara two\n")
    assert list(iter_texts(tmp_path / "a.txt", text_unit="line")) == ["para one", "still one", "para two"]
    assert list(iter_texts(tmp_path / "a.txt", text_unit="paragraph")) == ["para one\nstill one", "para two\n"]
    assert list(iter_texts(tmp_path / "a.txt")) == ["para one\nstill one\n\npara two\n"]
    (tmp_path / "b.jsonl").write_text('{"body": "x1", "id": 1}\n{"body": "x2", "id": 2}\n')
    assert list(iter_texts(tmp_path / "b.jsonl", field="body")) == ["x1", "x2"]
    datasets.Dataset.from_dict({"text": ["p1", "", "p2"]}).to_parquet(str(tmp_path / "c.parquet"))
    assert list(iter_texts([tmp_path / "c.parquet", tmp_path / "b.jsonl"], field="text", limit=2)) == ["p1", "p2"]
    assert list(iter_texts(str(tmp_path / "*.parquet"))) == ["p1", "p2"]


def test_loading_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n{"text": "ok"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        list(iter_texts(bad))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"nofield\.jsonl:2: no field 'text'"):
        list(iter_texts(nofield))
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        list(iter_texts(tmp_path / "nothere.jsonl"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        list(iter_texts(str(tmp_path / "*.parquet")))


# ------------------------------------------------------------------------------------------ built-in corpus

def test_generated_corpus_is_seeded_and_bilingual():
    small = dict(num_people=30, arithmetic_docs=40)
    a = builtin_corpus.generated_documents(0, **small)
    assert a == builtin_corpus.generated_documents(0, **small)
    assert a != builtin_corpus.generated_documents(1, **small)
    text = "\n".join(a)
    assert re.search(r"\d+ 加 \d+ 等于 \d+。", text) and re.search(r"What is \d+ plus \d+\?\nAnswer: \d+\.", text)
    assert "lives in" in text and "住在" in text
    for a_, b_, r in re.findall(r"(\d+) plus (\d+) equals (\d+)\.", text):
        assert int(a_) + int(b_) == int(r)
    for a_, b_, r in re.findall(r"(\d+) 乘以 (\d+) 等于 (\d+)。", text):
        assert int(a_) * int(b_) == int(r)


def test_eval_items_are_held_out_of_the_training_text():
    docs = builtin_corpus.generated_documents(0)
    text = "\n".join(docs)
    heldout = builtin_corpus.eval_items(0)
    attributes = {"city", "age", "job", "color", "pet"}
    assert {i.kind for i in heldout} == {"add", "sub", "mul"} | attributes | {f"read_{a}" for a in attributes}
    assert {i.task for i in heldout} == {"arithmetic", "facts", "reading"}
    assert {i.lang for i in heldout} == {"en", "zh"}
    assert not [i for i in heldout if i.prompt in text]
    # The facts behind held-out questions are stated in training (as prose), so they can be answered.
    people = [i for i in heldout if i.kind == "city" and i.lang == "en"]
    assert all(i.answer in text for i in people)
    arithmetic = [i for i in heldout if i.kind == "add" and i.lang == "en"]
    for item in arithmetic:
        a, b = map(int, re.findall(r"\d+", item.prompt))
        assert int(item.answer) == a + b
        assert f"{a} plus {b}" not in text and f"{b} plus {a}" not in text and f"{a} 加 {b}" not in text
    seen = builtin_corpus.eval_items(0, split="seen")
    assert all(builtin_corpus.qa_text(i) in text for i in seen)
    assert builtin_corpus.eval_items(0) == heldout


def test_reading_items_ask_about_a_passage_of_people_never_in_training():
    text = "\n".join(builtin_corpus.generated_documents(0))
    heldout = builtin_corpus.reading_items(0, split="heldout", count=200)
    assert {i.lang for i in heldout} == {"en", "zh"} and len({i.kind for i in heldout}) == 5
    world, pools = builtin_corpus._reading_world(0, 240)
    for item in heldout:
        passage, _, question = item.question.rpartition("\n")
        assert item.prompt == f"{passage}\n{builtin_corpus.qa_prompt(question, item.lang)}"
        # The question names one of the passage's two people, and the answer is that person's fact.
        named = [p for p in pools["heldout"] if (p.name_en if item.lang == "en" else p.name_zh) in question]
        assert len(named) == 1 and (named[0].name_en if item.lang == "en" else named[0].name_zh) in passage
        assert world.question(named[0], item.kind.removeprefix("read_"), item.lang) == (question, item.answer)
        assert item.answer.removesuffix("岁") in passage
    assert not [p for p in pools["heldout"] if p.name_en in text or p.name_zh in text]
    assert sum(p.name_en in text for p in pools["train"][:200]) > 50  # the passage people of training do occur
    train = builtin_corpus.finetuning_items(0)
    assert {i.task for i in train} == {"arithmetic", "facts", "reading"} and not [i for i in train if i.split == "heldout"]
    assert not {i.prompt for i in train} & {i.prompt for i in builtin_corpus.eval_items(0)}
    with pytest.raises(ValueError, match="split"):
        builtin_corpus.reading_items(0, split="seen")


def test_builtin_corpus_includes_python_docs():
    docs = builtin_corpus.builtin_documents(0, num_people=10, arithmetic_docs=10)
    text = "\n".join(docs)
    assert "The \"if\" statement is used for conditional execution" in text  # a pydoc help topic
    assert any(d.startswith("Open a bzip2-compressed file") for d in docs)  # stdlib docstrings
    assert len(text) > 1_000_000


# ------------------------------------------------------------------------------------------------- packing

def test_token_file_roundtrip_and_errors(tmp_path):
    meta = write_token_file(tmp_path / "t", [[1, 2, 3], [4]], vocab_size=10, eot_id=9, source="unit")
    tf = TokenFile(tmp_path / "t.bin")
    assert meta["dtype"] == "uint16" and meta["num_tokens"] == 6 and meta["num_documents"] == 2
    assert tf.tokens.tolist() == [1, 2, 3, 9, 4, 9] and tf.eot_id == 9
    big = write_token_file(tmp_path / "u", [[70000]], vocab_size=70001, eot_id=0)
    assert big["dtype"] == "uint32" and TokenFile(tmp_path / "u").tokens.tolist() == [70000, 0]
    with pytest.raises(FileNotFoundError, match="nope.json"):
        TokenFile(tmp_path / "nope")
    (tmp_path / "t.bin").write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match="2 bytes"):
        TokenFile(tmp_path / "t")
    write_token_file(tmp_path / "e", [], vocab_size=10, eot_id=9)
    with pytest.raises(ValueError, match="empty"):
        TokenFile(tmp_path / "e")
    with pytest.raises(ValueError, match="out of range"):
        write_token_file(tmp_path / "x", [[10]], vocab_size=10, eot_id=9)


def test_unigram_entropy(tmp_path):
    write_token_file(tmp_path / "t", [[0, 1, 2]] * 4, vocab_size=8, eot_id=3)  # four symbols, equally often
    assert TokenFile(tmp_path / "t").unigram_entropy() == pytest.approx(np.log(4))


def test_pack_rows_boundaries_and_labels():
    eot = 0
    rows = np.array([[5, 6, 0, 7, 8, 9, 0, 4],
                     [3, 0, 0, 2, 2, 2, 2, 0]])
    batch = pack_rows(rows, eot)
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0, 3, 7, 8, 10, 11, 16]
    assert batch["max_seqlen"] == 5
    labels = batch["labels"].tolist()
    assert labels[0] == [5, 6, 0, IGNORE_INDEX, 8, 9, 0, IGNORE_INDEX]
    assert labels[1] == [3, 0, IGNORE_INDEX, IGNORE_INDEX, 2, 2, 2, 0]
    assert count_targets(batch) == 10


def test_packed_loss_equals_per_document_loss():
    """The labels and boundaries together give exactly the loss of running each segment on its own."""
    torch.manual_seed(0)
    config = SparrowConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = SparrowForCausalLM(config).eval()
    rng = np.random.default_rng(0)
    rows = rng.integers(1, 16, size=(2, 12))
    rows[0, [3, 8]] = 0
    rows[1, [5]] = 0
    batch = pack_rows(rows, eot_id=0)
    packed = model(batch["input_ids"], labels=batch["labels"], cu_seqlens=batch["cu_seqlens"],
                   max_seqlen=batch["max_seqlen"]).loss
    flat = batch["input_ids"].reshape(-1)
    cu = batch["cu_seqlens"].tolist()
    total, count = 0.0, 0
    for start, end in zip(cu[:-1], cu[1:]):
        segment = flat[start:end][None]
        if segment.shape[1] < 2:
            continue
        loss = model(segment, labels=segment).loss
        total += loss.item() * (segment.shape[1] - 1)
        count += segment.shape[1] - 1
    assert packed.item() == pytest.approx(total / count, rel=1e-5)


def test_packed_dataset_order_is_seeded_and_covers_every_window(tmp_path):
    write_token_file(tmp_path / "t", [list(range(1, 9))] * 30, vocab_size=16, eot_id=0)  # 270 tokens
    tf = TokenFile(tmp_path / "t")
    ds = PackedDataset(tf, seq_len=9, seed=3, val_windows=5)
    assert ds.num_train == 25 and ds.num_val_samples == 5
    epoch0 = [ds.train_index(k) for k in range(25)]
    epoch1 = [ds.train_index(k) for k in range(25, 50)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(25)) and epoch0 != epoch1
    assert epoch0 == [PackedDataset(tf, 9, seed=3, val_windows=5).train_index(k) for k in range(25)]
    assert epoch0 != [PackedDataset(tf, 9, seed=4, val_windows=5).train_index(k) for k in range(25)]
    # Two ranks reading interleaved micro-batches read exactly the single-process global batch.
    whole = ds.train_batch(10, 4)["input_ids"]
    ranks = torch.cat([ds.train_batch(10 + r * 2, 2)["input_ids"] for r in range(2)])
    assert torch.equal(whole, ranks)
    assert ds.val_batch(0, 5)["input_ids"].shape == (5, 9)
    with pytest.raises(ValueError, match="too few"):
        PackedDataset(tf, seq_len=300)
