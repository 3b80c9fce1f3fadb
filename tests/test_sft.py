import json

import pytest
import torch

from sparrow import SparrowConfig, SparrowForCausalLM
from sparrow.post_training.chat_data import SFTDataset, encode_chat, read_records, to_messages
from sparrow.tokenizer.chat import TEMPLATES, render, render_jinja
from sparrow.tokenizer import Tokenizer, train_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello world"},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": " 世界!"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    texts = ["Hello world, 你好世界. The capital of France is Paris."] * 20 + ["##提问:\n什么?\n##回答:\n好的"] * 10
    train_tokenizer(texts, vocab_size=400, out_dir=folder, show_progress=False)
    return Tokenizer.from_file(folder / "tokenizer.json")


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_python_formatter_equals_the_jinja_template(template, generation_prompt):
    for messages in (CHAT, CHAT[1:3], CHAT[1:2]):
        assert render(messages, template, generation_prompt) == render_jinja(TEMPLATES[template], messages, generation_prompt)


def test_templates_render_the_documented_strings():
    assert render(CHAT[:3], "sparrow") == ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n"
                                           "<|assistant|>\nHello world<|end|>\n")
    assert render(CHAT[1:2], "qa", add_generation_prompt=True) == "##提问:\nHi there\n##回答:\n"
    with pytest.raises(ValueError, match="role"):
        render([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_labels_cover_exactly_the_assistant_answers_and_their_end_tokens(tok, template):
    ids, labels = encode_chat(tok, CHAT, template)
    assert ids == tok.encode(render(CHAT, template), allowed_special="all")
    end = tok.token_to_id("<|end|>")
    labelled = [i for i, l in enumerate(labels) if l != -100]
    assert all(labels[i] == ids[i] for i in labelled)
    # Two answers: each a contiguous run ending in <|end|>, decoding to the answer text.
    runs, run = [], [labelled[0]]
    for i in labelled[1:]:
        if i == run[-1] + 1:
            run.append(i)
        else:
            runs.append(run)
            run = [i]
    runs.append(run)
    assert [tok.decode([ids[i] for i in r]) for r in runs] == ["Hello world<|end|>", " 世界!<|end|>"]
    assert all(ids[r[-1]] == end for r in runs)


def test_alpaca_and_belle_records_become_chats():
    alpaca = {"instruction": "Translate", "input": "cat", "output": "猫"}
    assert to_messages(alpaca) == [{"role": "user", "content": "Translate\ncat"}, {"role": "assistant", "content": "猫"}]
    belle = {"instruction": "再说一遍", "output": "好", "history": [["你好", "你好!"]], "system": "S"}
    assert [m["role"] for m in to_messages(belle)] == ["system", "user", "assistant", "user", "assistant"]
    with pytest.raises(ValueError, match="messages"):
        to_messages({"text": "no chat"})


def test_jsonl_through_datasets_to_batches_padded_and_packed(tok, tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [{"messages": CHAT[1:3]}, {"instruction": "What is the capital of France?", "input": "", "output": "Paris"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    records = read_records(path)
    padded = SFTDataset.from_records(records, tok, template="qa")
    packed = SFTDataset.from_records(records, tok, template="qa", pack=True)
    a, b = padded.train_batch(0, 2), packed.train_batch(0, 2)
    assert a["input_ids"].shape[0] == 2 and b["input_ids"].shape[0] == 1
    assert int(b["cu_seqlens"][-1]) == b["input_ids"].shape[1]
    torch.manual_seed(0)
    model = SparrowForCausalLM(SparrowConfig.from_preset("tiny", vocab_size=tok.vocab_size, num_hidden_layers=2),
                               backend="reference")
    # Same conversations, same targets: the padded and packed losses agree.
    loss_padded = model(a["input_ids"], labels=a["labels"]).loss
    loss_packed = model(b["input_ids"], labels=b["labels"], cu_seqlens=b["cu_seqlens"], max_seqlen=b["max_seqlen"]).loss
    torch.testing.assert_close(loss_padded, loss_packed, atol=1e-5, rtol=1e-5)
