import json

import pytest
import torch

from sparrow import SparrowConfig, SparrowForCausalLM
from sparrow.export import export_hf
from sparrow.tokenizer.chat import render
from sparrow.tokenizer import Tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello world, 你好世界. The capital of France is Paris.", "def f(x):\n    return x + 1\n", "数字 12345 和 emoji 🐦"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    train_tokenizer(TEXTS * 10, vocab_size=420, out_dir=root / "tok", show_progress=False)
    torch.manual_seed(0)
    for tied in (True, False):
        config = SparrowConfig.from_preset("tiny", vocab_size=420, num_hidden_layers=2, tie_word_embeddings=tied)
        model = SparrowForCausalLM(config, backend="reference").eval()
        export_hf(model, root / "tok", root / f"hf_{tied}")
    return root


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_the_export_and_gives_equal_logits(exported, tied):
    folder = exported / f"hf_{tied}"
    ours = SparrowForCausalLM.from_pretrained(folder, backend="reference").eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 420, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_autotokenizer_tokenizes_and_templates_like_sparrow(exported):
    folder = exported / "hf_True"
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    ours = Tokenizer.from_file(folder / "tokenizer.json")
    chat = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hello world"}]
    for text in TEXTS + ["unseen: Ωμέγα ✓", render(chat)]:
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text, allowed_special="all")
    assert hf.apply_chat_template(chat, tokenize=False) == render(chat)
    assert hf.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True) == render(chat[:1], add_generation_prompt=True)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert ours.token_to_id("<|end|>") in generation["eos_token_id"]
