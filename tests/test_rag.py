"""Retrieval: tokenisation for Chinese and English, chunking, the index on disk, the built-in world's evaluation,
and the retrieved passages reaching the prompt of `sparrow chat --rag` and `sparrow serve --rag`."""

import json

import pytest

pytest.importorskip("bm25s")

from _serve_model import trained_model  # noqa: E402

from sparrow.cli import main  # noqa: E402
from sparrow.rag import (Chunk, RagIndex, build_index, chunk_text, evaluate_rag, facts_queries, format_prompt,  # noqa: E402
                         read_units, tokenize, training_records, world_documents)


def test_tokenize_mixes_words_and_chinese_bigrams():
    assert tokenize("Dun Kai lives in ASHFORD, aged 42.") == ["dun", "kai", "lives", "in", "ashford", "aged", "42"]
    assert tokenize("王明住在青川城") == ["王", "明", "住", "在", "青", "川", "城",
                                    "王明", "明住", "住在", "在青", "青川", "川城"]
    assert tokenize("王明 likes 猫") == ["王", "明", "王明", "likes", "猫"]
    assert tokenize("...!?") == []


def test_chunks_are_cut_between_sentences():
    text = "One two three. Four five six! Seven eight nine? 十一十二。十三十四。"
    pieces = chunk_text(text, chunk_chars=30)
    assert pieces == ["One two three. Four five six!", "Seven eight nine? 十一十二。十三十四。"]
    assert all(len(p) <= 30 for p in pieces)
    assert chunk_text("short", 30) == ["short"] and chunk_text("   ", 30) == []
    with pytest.raises(ValueError, match="chunk_chars"):
        chunk_text("x", 0)


def test_documents_are_read_by_type_and_bad_ones_named(tmp_path):
    md = tmp_path / "notes.md"
    md.write_text("# Title\nfirst paragraph\n\nsecond paragraph\n", encoding="utf-8")
    assert list(read_units(md)) == [("# Title\nfirst paragraph", 1), ("second paragraph", 4)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"content": "b"}\n{"title": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"docs.jsonl:4: needs a string field 'text'"):
        list(read_units(jsonl))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.jsonl:2: malformed JSON"):
        list(read_units(broken))
    with pytest.raises(ValueError, match=r"\.pdf"):
        list(read_units(tmp_path / "paper.pdf"))


def test_index_command_round_trip_finds_the_right_passage(tmp_path, capsys):
    en = tmp_path / "en.txt"
    en.write_text("Bala Kou lives in Dunmore. Bala Kou is a baker.\n\nZifo Rane lives in Ashford. Zifo Rane keeps a "
                  "cat.\n", encoding="utf-8")
    zh = tmp_path / "zh.jsonl"
    zh.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                          for t in ["王明住在青川城。王明是一名教师。", "李华住在白溪城。李华养了一只猫。"]), encoding="utf-8")
    assert main(["rag", "index", str(en), str(zh), "-o", str(tmp_path / "idx")]) == 0
    assert "indexed 4 chunks from 2 file(s)" in capsys.readouterr().out
    index = RagIndex.load(tmp_path / "idx")
    assert [c.source for c in index.chunks] == [str(en), str(en), str(zh), str(zh)]
    assert [c.line for c in index.chunks] == [1, 3, 1, 2]
    assert index.search("Where does Zifo Rane live?", k=1)[0][1].text.startswith("Zifo Rane")
    assert index.search("李华住在哪里？", k=1)[0][1].text.startswith("李华")
    assert index.search("nothing matches this", k=2) == []
    assert index.augment("王明的职业是什么？", k=1) == "王明住在青川城。王明是一名教师。\n王明的职业是什么？"
    with pytest.raises(FileNotFoundError, match="not a retrieval index"):
        RagIndex.load(tmp_path)


def test_world_retrieval_puts_passages_in_the_reading_task_layout():
    from sparrow.data.builtin_corpus import reading_items

    docs = world_documents()
    assert len(docs) == 480 and docs[0]["person"] == docs[1]["person"] == 0
    index = RagIndex.build([Chunk(d["text"], "world", n + 1) for n, d in enumerate(docs)])
    queries = facts_queries()
    assert len(queries) == 480 and all(item.task == "facts" and item.split == "heldout" for _, item in queries)
    person, item = queries[0]
    found = index.search(item.question, k=2)
    assert docs[[c.text for c in index.chunks].index(found[0][1].text)]["person"] == person
    # The reading task's user turn is "<biography>\n<biography>\n<question>": so is the augmented question.
    reading = reading_items(split="heldout", count=1)[0]
    assert reading.question.count("\n") == 2
    augmented = index.augment(item.question, k=2)
    assert augmented.count("\n") == 2 and augmented.endswith("\n" + item.question)
    assert format_prompt([], "q") == "q"
    records = training_records(20)
    assert len(records) == 20 and all(r["messages"][0]["content"].count("\n") in (1, 2) for r in records)
    from sparrow.data.builtin_corpus import World

    with pytest.raises(ValueError, match="questions"):
        training_records(1, questions=6)
    text = "".join(r["messages"][0]["content"] for r in training_records(400))
    assert not [p.name_en for p in World(0).people if p.name_en in text]  # other worlds' people


def test_rag_eval_reports_hit_rate_and_exact_match(tmp_path_factory, tmp_path, capsys):
    model = trained_model(tmp_path_factory)
    out = tmp_path / "rag.json"
    assert main(["rag", "eval", str(model), "--limit", "12", "--out", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["questions"] == 12 and result["k"] == 2
    assert result["retrieval_hit_rate"] >= 0.9  # BM25 on names finds the asked person's biography
    assert 0 <= result["exact_match_without_retrieval"] <= 1 and 0 <= result["exact_match_with_retrieval"] <= 1
    assert "\n" in result["samples_with_retrieval"][0]["question"]
    assert "exact match with retrieval" in capsys.readouterr().out


def test_retrieval_fine_tuning_recipe_runs_end_to_end(tmp_path_factory, tmp_path, capsys):
    """README's recipe at test scale: `sparrow rag records`, `sparrow sft --config configs/sft_rag_tiny.yaml` (from
    the test's model instead of runs/pretrain-tiny/model, a few steps), `sparrow rag eval --k 1`. The learning
    gain itself is measured at full scale (README), not asserted here."""
    from pathlib import Path

    config = Path(__file__).parents[1] / "configs" / "sft_rag_tiny.yaml"
    start = trained_model(tmp_path_factory)
    assert main(["rag", "records", str(tmp_path / "rag.jsonl"), "--count", "24", "--max-passages", "1",
                 "--questions", "5"]) == 0
    records = [json.loads(line) for line in (tmp_path / "rag.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 24 and all([m["role"] for m in r["messages"]] == ["user", "assistant"] * 5 for r in records)
    for r in records:  # the passage opens the conversation, then five questions about its person's five facts
        turns = [m["content"] for m in r["messages"]]
        assert turns[0].count("\n") == 1 and all("\n" not in t for t in turns[1:])
        assert all(answer in turns[0] for answer in turns[1::2])
    # The test's tokenizer knows few characters (Chinese falls back to bytes): longer sequences than the recipe's.
    assert main(["sft", "--config", str(config), f"model.init_from={start}", "model.backend=reference",
                 f"train.out_dir={tmp_path / 'sft'}", "train.max_steps=2", "train.warmup_steps=1", "train.eval_every=0",
                 "train.save_every=0", "train.progress=false", "train.plot=false", "data.micro_batch_size=4",
                 "data.seq_len=512", "sft.max_length=512", f"sft.data={tmp_path / 'rag.jsonl'}"]) == 0
    out = tmp_path / "rag_eval.json"
    capsys.readouterr()
    assert main(["rag", "eval", str(tmp_path / "sft" / "model"), "--k", "1", "--limit", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "McNemar exact p" in printed and "right only with / only without" in printed
    result = json.loads(out.read_text(encoding="utf-8"))
    n, with_, without = result["questions"], result["exact_match_with_retrieval"], result["exact_match_without_retrieval"]
    assert n == 8 and result["k"] == 1 and 0 <= result["mcnemar_p"] <= 1
    only_with, only_without = result["right_only_with_retrieval"], result["right_only_without_retrieval"]
    assert round((with_ - without) * n) == only_with - only_without  # the paired counts agree with the rates
    kinds = result["by_question_kind"]
    assert sum(k["questions"] for k in kinds.values()) == n and set(kinds) <= {
        f"{lang} {kind}" for lang in ("en", "zh") for kind in ("city", "age", "job", "color", "pet")}


def test_sft_starts_a_new_model_when_given_only_a_tokenizer(tmp_path_factory, tmp_path, capsys):
    """model.init_from null + sft.tokenizer: a new model.preset model with the tokenizer's vocabulary; any other
    stage, or sft without a tokenizer, still names the missing starting model."""
    from pathlib import Path

    from sparrow import SparrowForCausalLM
    from sparrow.tokenizer import Tokenizer

    config = Path(__file__).parents[1] / "configs" / "sft_rag_tiny.yaml"
    tokenizer = trained_model(tmp_path_factory) / "tokenizer.json"
    assert main(["rag", "records", str(tmp_path / "rag.jsonl"), "--count", "8"]) == 0
    common = [f"train.out_dir={tmp_path / 'new'}", "train.max_steps=1", "train.warmup_steps=1", "train.eval_every=0",
              "train.save_every=0", "train.progress=false", "train.plot=false", "model.backend=reference",
              "model.num_hidden_layers=1", "data.micro_batch_size=2", "data.seq_len=512", "sft.max_length=512",
              f"sft.data={tmp_path / 'rag.jsonl'}", "model.init_from=null"]
    assert main(["sft", "--config", str(config), *common]) == 2
    assert "sft.tokenizer" in capsys.readouterr().err
    assert main(["sft", "--config", str(config), *common, f"sft.tokenizer={tokenizer}"]) == 0
    model = SparrowForCausalLM.from_pretrained(tmp_path / "new" / "model")
    assert model.config.vocab_size == Tokenizer.from_file(tokenizer).vocab_size and model.config.num_hidden_layers == 1
    assert (tmp_path / "new" / "model" / "tokenizer.json").read_bytes() == tokenizer.read_bytes()


def test_mcnemar_exact_p():
    from sparrow.rag import mcnemar_p

    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(5, 0) == mcnemar_p(0, 5) == 2 / 2 ** 5
    assert abs(mcnemar_p(15, 2) - 2 * (1 + 17 + 136) / 2 ** 17) < 1e-12
    with pytest.raises(ValueError, match="b, c"):
        mcnemar_p(-1, 2)


def test_chat_and_serve_put_retrieved_passages_before_the_question(tmp_path_factory, tmp_path, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from sparrow.serving.adapter import load
    from sparrow.serving.engine import Engine
    from sparrow.serving.server import BackgroundServer, create_app

    model = trained_model(tmp_path_factory)
    docs = tmp_path / "docs.txt"
    docs.write_text("Bala Kou lives in Dunmore.\n\nZifo Rane lives in Ashford.\n", encoding="utf-8")
    index = build_index([docs])
    index.save(tmp_path / "idx")
    question = "Where does Bala Kou live?"
    loaded = load(str(model))
    expected = loaded.chat_ids([{"role": "user", "content": "Bala Kou lives in Dunmore.\n" + question}])

    with BackgroundServer(create_app(Engine(loaded), rag=RagIndex.load(tmp_path / "idx"), rag_k=1)) as server:
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": loaded.name, "messages": [{"role": "user", "content": question}], "max_tokens": 4}).json()
    assert reply["usage"]["prompt_tokens"] == len(expected)

    import sparrow.generate

    prompts = []
    real = sparrow.generate.stream_text
    monkeypatch.setattr(sparrow.generate, "stream_text",
                        lambda model, tok, prompt, config: prompts.append(prompt) or real(model, tok, prompt, config))
    lines = iter([question, ""])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    assert main(["chat", str(model), "--rag", str(tmp_path / "idx"), "--max-new-tokens", "4"]) == 0
    assert index.augment(question) == "Bala Kou lives in Dunmore.\n" + question  # no term of the other passage
    assert prompts == [expected]
