"""A checkpoint's own tokenizer and chat template: :func:`sparrow.model_folder.load_tokenizer` runs a tokenizer.json
through the C++ encoder when it implements the layout, else through HF tokenizers with a one-line notice (same ids
and text as HF); a transformers Llama folder with a Llama-3 Jinja chat template is fine-tuned with `sparrow sft`
on that template (labels exactly the rendered replies) and generation stops on the template's end of turn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_sft_config
import torch
import yaml

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from sparrow.cli import main  # noqa: E402
from sparrow.generate import GenerationConfig  # noqa: E402
from sparrow.model_folder import load_tokenizer  # noqa: E402
from sparrow.post_training.chat_data import encode_chat  # noqa: E402
from sparrow.post_training.preference_data import PreferenceDataset  # noqa: E402
from sparrow.tokenizer import Tokenizer  # noqa: E402
from sparrow.tokenizer.corpus import tokenize_corpus  # noqa: E402
from sparrow.tokenizer.chat import IGNORE_INDEX, prompt_ids, render_jinja, stop_ids, template_for  # noqa: E402
from sparrow.tokenizer.hf_fallback import HFTokenizer  # noqa: E402

TEXT = ["The cat sat on the mat. Hello World! What is 12 plus 30? It is 42.",
        "Ünïcödé text, ÀÉÎ and 世界; numbers 2024 and 3.14.\nNew lines\n\n and  spaces."] * 30
SAMPLES = ["Hello World", "WHAT is 12345?", "ÀÉÎ Ünï 世界\n\n x", "<|endoftext|>Hi<|eot_id|> there", ""]
SPECIALS = ["<|endoftext|>", "<|eot_id|>"]

# Llama-3-Instruct's chat template, as its tokenizer_config.json has it.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _train(folder, *, normalizer=None, pre_tokenizer=None, specials=SPECIALS, vocab_size=400):
    tok = tokenizers.Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok


def test_a_layout_the_encoder_refuses_runs_through_hf_tokenizers_with_one_notice(tmp_path, capsys):
    hf = _train(tmp_path / "m", normalizer=normalizers.Sequence([normalizers.NFKD(), normalizers.Lowercase()]))
    with pytest.raises(ValueError, match="normalizer"):
        Tokenizer.from_file(tmp_path / "m" / "tokenizer.json")
    tok = load_tokenizer(tmp_path / "m")
    notice = capsys.readouterr().err.strip().splitlines()
    assert isinstance(tok, HFTokenizer) and len(notice) == 1
    assert "normalizer" in notice[0] and "HF tokenizers" in notice[0] and "slower" in notice[0]
    for text in SAMPLES:
        expected = hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, allowed_special="all") == expected
        assert tok.decode(expected) == hf.decode(expected, skip_special_tokens=False)
    assert tok.encode_batch(SAMPLES[:3]) == [hf.encode(t, add_special_tokens=False).ids for t in SAMPLES[:3]]
    # Sparrow's special-token conventions: disallowed raises, disallowed_special=() encodes the text as ordinary.
    with pytest.raises(ValueError, match="disallowed special token"):
        tok.encode("a <|eot_id|>")
    ordinary = tok.encode("a <|eot_id|>", disallowed_special=())
    assert hf.token_to_id("<|eot_id|>") not in ordinary and tok.decode(ordinary) == "a <|eot_id|>"
    assert tok.encode("x<|eot_id|><|endoftext|>", allowed_special={"<|eot_id|>"}, disallowed_special=()) == (
        tok.encode("x") + [hf.token_to_id("<|eot_id|>")] + tok.encode_ordinary("<|endoftext|>"))
    assert tok.vocab_size == hf.get_vocab_size() and tok.eot_id == hf.token_to_id("<|endoftext|>")
    assert tok.token_to_id("<|eot_id|>") == hf.token_to_id("<|eot_id|>")
    # The corpus writer takes the folder too (pretraining data in the checkpoint's tokenizer).
    meta = tokenize_corpus(iter(["Hello World", "ÀÉÎ 42"]), tmp_path / "tokens", tmp_path / "m", show_progress=False)
    eot = hf.token_to_id("<|endoftext|>")
    written = np.fromfile(tmp_path / "tokens.bin", dtype=meta["dtype"]).tolist()
    assert written == hf.encode("Hello World", add_special_tokens=False).ids + [eot] + hf.encode(
        "ÀÉÎ 42", add_special_tokens=False).ids + [eot]


def test_a_supported_layout_runs_through_the_cpp_encoder_without_notice(tmp_path, capsys):
    hf = _train(tmp_path / "m")
    tok = load_tokenizer(tmp_path / "m")
    assert type(tok) is Tokenizer and capsys.readouterr().err == ""
    for text in SAMPLES:
        assert tok.encode(text, allowed_special="all") == hf.encode(text, add_special_tokens=False).ids


def _llama_folder(folder):
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf = _train(folder, pre_tokenizer=pre, specials=LLAMA3_SPECIALS, vocab_size=500)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=hf.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=hf.token_to_id("<|begin_of_text|>"),
                                      eos_token_id=hf.token_to_id("<|end_of_text|>"))
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return hf


def test_sft_from_a_llama_folder_uses_its_jinja_template_and_end_of_turn(tmp_path, capsys):
    folder = tmp_path / "llama"
    hf = _llama_folder(folder)
    capsys.readouterr()  # transformers' progress bar
    tok = load_tokenizer(folder)
    assert type(tok) is Tokenizer and capsys.readouterr().err == ""  # Llama-3's layout: the C++ encoder
    assert template_for(tok) == LLAMA3_TEMPLATE
    eot = hf.token_to_id("<|eot_id|>")
    assert stop_ids(tok)[0] == eot and hf.token_to_id("<|end_of_text|>") in stop_ids(tok)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 plus 30?"},
                {"role": "assistant", "content": "It is 42. "}, {"role": "user", "content": "Hello World"},
                {"role": "assistant", "content": "Hello!\nThe cat sat."}]
    ids, labels = encode_chat(tok, messages)
    rendered = render_jinja(LLAMA3_TEMPLATE, messages, bos_token="<|begin_of_text|>")
    assert tok.decode(ids) == rendered and ids[0] == hf.token_to_id("<|begin_of_text|>")
    spans, current = [], []
    for i, label in zip(ids + [0], labels + [IGNORE_INDEX]):  # a masked end closes the last span
        if label != IGNORE_INDEX:
            assert label == i
            current.append(i)
        elif current:
            spans.append(tok.decode(current))
            current = []
    assert spans == ["It is 42.<|eot_id|>", "Hello!\nThe cat sat.<|eot_id|>"]  # the template trims the content
    assert tok.decode(prompt_ids(tok, "Hi")) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi"
                                                 "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")

    chats = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                           {"role": "assistant", "content": f"It is {a + b}."}]} for a in range(4) for b in range(4)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    stage = write_sft_config(tmp_path, folder, max_steps=2)
    assert main(["sft", "--config", str(tmp_path / "sft.yaml")]) == 0
    assert "template the checkpoint's (Jinja)" in capsys.readouterr().out

    tuned_tok = load_tokenizer(tmp_path / "sft" / "model")
    assert template_for(tuned_tok) == LLAMA3_TEMPLATE and stop_ids(tuned_tok)[0] == eot
    assert GenerationConfig.for_tokenizer(tuned_tok).stop_ids[0] == eot
    assert main(["generate", str(tmp_path / "sft" / "model"), "What is 1 plus 2?", "--chat", "--max-new-tokens", "6"]) == 0
    assert "<|eot_id|>" not in capsys.readouterr().out  # stopped on (and stripped) the template's end of turn

    # DPO from the tuned folder: its pairs are encoded with the same template.
    pair = {"prompt": "What is 1 plus 2?", "chosen": "It is 3.", "rejected": "It is 4."}
    chosen_ids, chosen_labels = PreferenceDataset([pair], tuned_tok).train[0]["chosen"]
    assert tok.decode([t for t in chosen_labels if t != IGNORE_INDEX]) == "It is 3.<|eot_id|>"
    (tmp_path / "pairs.jsonl").write_text(json.dumps(pair) + "\n" + json.dumps(pair) + "\n")
    stage["model"]["init_from"] = str(tmp_path / "sft" / "model")
    stage["train"]["out_dir"] = str(tmp_path / "dpo")
    stage["dpo"] = {"data": str(tmp_path / "pairs.jsonl"), "val_fraction": 0.0}
    del stage["sft"]
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(stage))
    assert main(["dpo", "--config", str(tmp_path / "dpo.yaml")]) == 0
    assert template_for(load_tokenizer(tmp_path / "dpo" / "model")) == LLAMA3_TEMPLATE
