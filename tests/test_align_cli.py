import json

import pytest
import torch
import yaml

from sparrow import SparrowConfig, SparrowForCausalLM
from sparrow.post_training.reward_model import RewardModel
from sparrow.cli import main
from sparrow.tokenizer import Tokenizer, train_tokenizer

TEXTS = ["Question: What is 2 plus 3?\nAnswer: 5.", "问题：3 加 4 等于多少？\n答案：7。", "Hello world, the cat sat."]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    folder = root / "pretrained"
    train_tokenizer(TEXTS * 20, vocab_size=400, out_dir=folder, show_progress=False)
    torch.manual_seed(0)
    config = SparrowConfig.from_preset("tiny", vocab_size=400, num_hidden_layers=2, max_position_embeddings=128)
    SparrowForCausalLM(config).save_pretrained(folder)
    chats = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]}
             for a in range(4) for b in range(4)]
    chats.append({"instruction": "Say hello", "input": "", "output": "Hello world"})
    (root / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    pairs = [{"prompt": f"What is {a} plus 1?", "chosen": str(a + 1), "rejected": str(a + 7)} for a in range(8)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root


def stage_config(root, stage, init_from, **own):
    values = {"model": {"init_from": str(init_from), "backend": "reference"},
              "data": {"seq_len": 64, "micro_batch_size": 4},
              "train": {"out_dir": str(root / stage), "max_steps": 3, "warmup_steps": 1, "lr": 1e-3, "eval_every": 0,
                        "save_every": 0, "progress": False, "plot": False},
              stage: {"data": str(root / own.pop("data")), **own}}
    path = root / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_sft_dpo_rm_generate_eval_export_from_the_command_line(start, capsys):
    root = start
    assert main(["sft", "--config", str(stage_config(root, "sft", root / "pretrained", data="sft.jsonl", template="qa"))]) == 0
    sft_model = root / "sft" / "model"
    tok_config = json.loads((sft_model / "tokenizer_config.json").read_text())
    assert "##回答" in tok_config["chat_template"]

    assert main(["dpo", "--config", str(stage_config(root, "dpo", sft_model, data="pairs.jsonl", val_fraction=0.25)),
                 "dpo.beta=0.2"]) == 0
    records = [json.loads(line) for line in (root / "dpo" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "loss" in r and r.get("step") == 1)
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step
    assert "rewards/accuracy" in first and "rewards/margin" in first

    assert main(["rm", "--config", str(stage_config(root, "rm", sft_model, data="pairs.jsonl"))]) == 0
    rm = RewardModel.from_pretrained(root / "rm" / "model")
    assert rm.score.weight.shape == (1, 128)

    capsys.readouterr()
    assert main(["generate", str(sft_model), "What is 1 plus 1?", "2 plus 2", "--max-new-tokens", "4"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["What is 1 plus 1?", "2 plus 2"]

    out = root / "eval.json"
    assert main(["eval", str(root / "dpo" / "model"), "--reference", str(sft_model), "--pairs", str(root / "pairs.jsonl"),
                 "--limit", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["perplexity"] > 1 and 0 <= result["exact_match"] <= 1
    assert result["preference"]["n"] == 8
    assert main(["export", str(root / "dpo" / "model"), str(root / "hf")]) == 0
    assert {p.name for p in (root / "hf").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                           "tokenizer_config.json", "generation_config.json"}


def test_stage_config_errors_name_the_key(start, capsys):
    path = stage_config(start, "sft", start / "pretrained", data="sft.jsonl")
    assert main(["sft", "--config", str(path), "sft.beta_typo=1"]) == 2
    assert "sft: unknown keys ['beta_typo']" in capsys.readouterr().err


def test_pairs_command_builds_preference_data_from_a_checkpoint(start, tmp_path, capsys):
    import shutil

    chats = tmp_path / "chats.jsonl"
    assert main(["data", "chats", str(chats)]) == 0
    records = [json.loads(line) for line in chats.read_text(encoding="utf-8").splitlines()]
    assert len(records) > 1000 and [m["role"] for m in records[0]["messages"]] == ["user", "assistant"]
    # A checkpoint's model folder has no tokenizer of its own: the run folder's is found.
    run = tmp_path / "run"
    shutil.copytree(start / "pretrained", run / "checkpoints" / "step_00000001" / "model",
                    ignore=shutil.ignore_patterns("tokenizer*"))
    shutil.copyfile(start / "pretrained" / "tokenizer.json", run / "tokenizer.json")
    short = tmp_path / "short.jsonl"  # the fixture's model has a 128-token context: no reading passages
    short.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records
                             if len(r["messages"][0]["content"]) < 40), encoding="utf-8")
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", str(run / "checkpoints" / "step_00000001" / "model"), str(short), str(out), "--limit", "8",
                 "--max-new-tokens", "4", "--seed", "3"]) == 0
    pairs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    answers = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in records}
    assert pairs and all(set(p) == {"prompt", "chosen", "rejected"} for p in pairs)
    assert all(answers[p["prompt"]] == p["chosen"] != p["rejected"] for p in pairs)
    assert f"wrote {len(pairs)} pairs" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    assert main(["pairs", str(start / "pretrained"), str(bad), str(out)]) == 2
    assert "bad.jsonl:1: the conversation must end with a user turn" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm"])
def test_shipped_stage_configs_are_valid(stage):
    from pathlib import Path

    from sparrow.post_training.stages import load_stage_config

    path = Path(__file__).parents[1] / "configs" / f"{stage}_tiny.yaml"
    config, options = load_stage_config(stage, path)
    assert options.data.startswith("runs/data/") and config.model.init_from.startswith("runs/")
    assert options.max_length <= config.data.seq_len
    if stage == "dpo":
        assert options.rpo_alpha > 0 and options.beta == 0.1


def test_a_missing_starting_model_names_the_folder_and_the_command_that_makes_it(start, tmp_path, capsys):
    config = stage_config(tmp_path, "sft", tmp_path / "no-such-model", data="sft.jsonl")
    (tmp_path / "sft.jsonl").write_text((start / "sft.jsonl").read_text())
    assert main(["sft", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "no-such-model: no model to start from" in err and "`sparrow pretrain`" in err and "<stage>" not in err
    config = stage_config(tmp_path, "dpo", tmp_path / "no-such-model", data="sft.jsonl")
    assert main(["dpo", "--config", str(config)]) == 2
    assert "`sparrow sft`" in capsys.readouterr().err
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("sft: {data: [unclosed\n")
    assert main(["sft", "--config", str(bad_yaml)]) == 2
    assert "bad.yaml: not valid YAML" in capsys.readouterr().err  # load_config's handling, shared by the stages


def test_a_corrupted_weights_file_is_an_error_naming_it(start, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(start / "pretrained", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated copy
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        SparrowForCausalLM.from_pretrained(folder)
    assert main(["generate", str(folder), "hello"]) == 2
    assert f"{weights}: not a readable safetensors file" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        RewardModel.from_pretrained(folder)


def test_checkpoint_model_folders_find_the_run_tokenizer(start, tmp_path):
    from sparrow.model_folder import find_tokenizer, load_model_and_tokenizer

    run = tmp_path / "run"
    model_dir = run / "checkpoints" / "step_00000002" / "model"
    SparrowForCausalLM.from_pretrained(start / "pretrained").save_pretrained(model_dir)
    with pytest.raises(FileNotFoundError, match="tokenizer.json: not found"):
        find_tokenizer(model_dir)
    (run / "tokenizer.json").write_text((start / "pretrained" / "tokenizer.json").read_text())
    assert find_tokenizer(model_dir) == run / "tokenizer.json"
    model, tok = load_model_and_tokenizer(model_dir)
    assert not model.training and tok.vocab_size == Tokenizer.from_file(start / "pretrained" / "tokenizer.json").vocab_size


def test_old_module_paths_still_work_and_warn():
    import importlib
    import sys

    for old, name in (("sparrow.align", "DPOObjective"), ("sparrow.sft", "render"), ("sparrow.stages", "build_sft"),
                      ("sparrow.preference", "build_pairs"), ("sparrow.evaluate", "exact_match")):
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.")):
            module = importlib.import_module(old)
        assert callable(getattr(module, name))
