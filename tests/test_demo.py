"""`sparrow demo`: the checks it makes, a shrunk run of the whole chain, and the default run's claims."""

import json

import pytest

from sparrow.cli import main
import sparrow.demo
from sparrow.demo import DPO_OPTIONS, Demo, heldout_sample, learning_checks, run_demo, run_dpo


def rows(pre=(0.0, 0.01), sft=(0.30, 0.60, 0.40), dpo=(0.31, 0.70, 0.90)):
    return [{"stage": "pretrain", "exact_match_raw_prompt": pre[0], "exact_match_chat": pre[1]},
            {"stage": "sft", "exact_match_chat": sft[0], "preference_accuracy": sft[1], "preference_margin": sft[2]},
            {"stage": "dpo", "exact_match_chat": dpo[0], "preference_accuracy": dpo[1], "preference_margin": dpo[2]}]


def test_learning_checks_state_each_claim_with_its_figures():
    checks = learning_checks(rows())
    assert [c["passed"] for c in checks] == [True, True, True, True]
    assert checks[0]["figures"] == "0.010 -> 0.300"  # the better of the two ways of asking the pretrained model
    failed = learning_checks(rows(pre=(0.4, 0.0), dpo=(0.29, 0.60, 0.90)))
    assert [c["passed"] for c in failed] == [False, False, True, False]
    assert failed[3]["claim"] == "DPO does not lower exact match beyond noise" and failed[3]["figures"] == "0.300 -> 0.290"


def test_exact_match_may_drop_by_sampling_noise_only():
    """With the item count, DPO's exact match may fall by up to two standard errors of the difference."""
    def dpo_check(sft_em, dpo_em, n):
        r = rows(sft=(sft_em, 0.60, 0.40), dpo=(dpo_em, 0.70, 0.90))
        r[2]["exact_match_items"] = n
        return learning_checks(r)[3]

    held = dpo_check(0.057, 0.043, 300)  # 17 -> 13 of 300 items: 2 standard errors are 0.036
    assert held["passed"] and held["figures"] == "0.057 -> 0.043 (allowed drop 0.036: 2 standard errors on 300 items)"
    assert not dpo_check(0.057, 0.010, 300)["passed"]
    assert not dpo_check(0.30, 0.20, 300)["passed"]  # 0.1 against an allowance of 0.072
    assert dpo_check(0.30, 0.25, 300)["passed"]


def test_grpo_claims_are_reported_with_their_figures_and_do_not_gate():
    grpo = {"stage": "grpo", "exact_match_chat": 0.3, "arithmetic_start": 0.02, "arithmetic_exact_match": 0.07,
            "arithmetic_items": 240, "reward_first": 0.4, "reward_last": 0.6}
    checks = learning_checks(rows() + [grpo])
    assert [c["passed"] for c in checks] == [True] * 6 and [c["required"] for c in checks] == [True] * 4 + [False] * 2
    assert checks[4]["figures"] == "0.020 -> 0.070 on 240 items" and checks[5]["figures"].startswith("0.400 -> 0.600")
    short = learning_checks(rows() + [{**grpo, "arithmetic_exact_match": 0.06, "arithmetic_items": 150,
                                       "reward_last": 0.3}])
    assert [c["passed"] for c in short[4:]] == [False, False]


def test_minutes_scale_every_stage():
    from sparrow.demo import DEFAULT_STEPS, scaled_steps

    assert scaled_steps(None) == DEFAULT_STEPS == {"pretrain": 240, "sft": 300, "dpo": 60, "grpo": 60}
    assert scaled_steps(60) == {"pretrain": 1200, "sft": 1500, "dpo": 300, "grpo": 300}
    assert scaled_steps(6)["sft"] == 150
    with pytest.raises(ValueError, match="minutes"):
        scaled_steps(0)


def test_typed_answers_are_values_of_the_asked_kind():
    from sparrow.data.builtin_corpus import EvalItem, answer_has_the_asked_type, eval_items

    items = {(i.kind, i.lang): i for i in eval_items(0)}
    answers = {("city", "en"): items["city", "en"].answer, ("read_job", "zh"): "木匠", ("age", "zh"): "31岁",
               ("add", "en"): "-4", ("pet", "en"): "red", ("age", "en"): "31岁", ("mul", "zh"): "12个"}
    typed = {key: answer_has_the_asked_type(items[key], answer) for key, answer in answers.items()}
    assert typed == {("city", "en"): True, ("read_job", "zh"): True, ("age", "zh"): True, ("add", "en"): True,
                     ("pet", "en"): False, ("age", "en"): False, ("mul", "zh"): False}
    assert all(answer_has_the_asked_type(i, i.answer) for i in eval_items(0))


def test_heldout_sample_weighs_the_tasks_equally():
    sample = heldout_sample(0, 7)
    assert len(sample) == 21 and {i.task for i in sample} == {"facts", "arithmetic", "reading"}
    assert all(i.split == "heldout" for i in sample) and heldout_sample(0, 7) == sample


@pytest.mark.parametrize("moe", [False, True])
def test_dpo_stage_takes_its_options_from_the_model_kind(tmp_path, monkeypatch, moe):
    seen = {}

    def fake_build_dpo(config, options, pairs, log):
        seen.update(options=options, config=config)
        raise StopIteration  # the stage itself is exercised by the shrunk run below

    monkeypatch.setattr(sparrow.demo, "build_dpo", fake_build_dpo)
    with pytest.raises(StopIteration):
        run_dpo(Demo(tmp_path), [], steps=3, moe=moe)
    options = seen["options"]
    expected = DPO_OPTIONS["moe" if moe else "dense"]
    assert (options.beta, options.rpo_alpha) == (expected["beta"], expected["rpo_alpha"])
    assert seen["config"].train.max_steps == 3 and seen["config"].model.init_from == str(tmp_path / "sft" / "model")
    assert DPO_OPTIONS["dense"]["rpo_alpha"] > 0  # the dense demo keeps exact match with the RPO term


@pytest.mark.slow
def test_shrunk_demo_runs_every_stage_and_writes_the_report(tmp_path):
    overrides = {"data.builtin_python_docs": False, "data.builtin_arithmetic_docs": 40, "data.builtin_reading_docs": 40,
                 "data.builtin_num_people": 60,
                 "model.vocab_size": 512, "model.num_hidden_layers": 1, "model.hidden_size": 64}
    lines = []
    result = run_demo(tmp_path / "demo", pretrain_steps=3, sft_steps=4, dpo_steps=2, grpo_steps=2, eval_per_task=2,
                      cache_dir=tmp_path / "cache", overrides=overrides, log=lines.append)
    report = tmp_path / "demo" / "report"
    saved = json.loads((report / "metrics.json").read_text())
    assert [r["stage"] for r in saved["stages"]] == ["pretrain", "sft", "dpo", "grpo"]
    assert all(0 <= r["typed_answer_chat"] <= 1 for r in saved["stages"])
    assert len(saved["checks"]) == 6 and saved["checks"] == result["checks"]
    assert saved["stages"][3]["arithmetic_items"] >= 200 and len(saved["grpo_reward_curve"]) == 2
    assert set(saved["exact_match_by_task"]["sft"]) == {"facts", "arithmetic", "reading"}
    assert saved["cleaning"]["documents_out"] <= saved["cleaning"]["documents_in"]
    assert "cleaning" in "\n".join(lines) and any(line.startswith("\nchecks:") for line in lines)
    for name in ("sft_train.jsonl", "pairs_train.jsonl", "pairs_heldout.jsonl", "loss_pretrain.png", "reward_grpo.png",
                 "hf_model/config.json", "hf_model/tokenizer_config.json"):
        assert (report / name).is_file(), name
    chats = [json.loads(line) for line in (report / "sft_train.jsonl").read_text().splitlines()]
    assert [m["role"] for m in chats[0]["messages"]] == ["user", "assistant"]
    # Questions about the corpus's own (smaller) world: 48 seen people x 10 questions, plus arithmetic and reading.
    assert len(chats) == 48 * 10 * 2

    # `sparrow eval` scores the demo's held-out items through the same evaluation: the same figures.
    demo = tmp_path / "demo"
    assert main(["eval", str(demo / "dpo" / "model"), "--per-task", "2", "--num-people", "60",
                 "--pairs", str(report / "pairs_heldout.jsonl"), "--reference", str(demo / "pretrain" / "model"),
                 "--max-length", "192", "--out", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    dpo = saved["stages"][2]
    assert evaluated["items"] == 6 and evaluated["by_task"] == saved["exact_match_by_task"]["dpo"]
    assert evaluated["exact_match"] == dpo["exact_match_chat"] and evaluated["typed_answer"] == dpo["typed_answer_chat"]
    assert evaluated["preference"]["preference_accuracy"] == dpo["preference_accuracy"]
    assert evaluated["preference"]["margin"] == pytest.approx(dpo["preference_margin"], abs=1e-6)


@pytest.mark.slow
def test_default_demo_shows_learning_on_held_out_items(tmp_path, monkeypatch):
    """The README's main job, as shipped: every gating learning claim holds (`sparrow demo --check` exits 0). About
    twelve minutes on 2 CPU cores, the longest test: `pytest -m "not slow"` leaves it out."""
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--check", "--out", str(tmp_path / "demo")]) == 0
    checks = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())["checks"]
    assert all(c["passed"] for c in checks if c["required"]), checks
    assert [c["required"] for c in checks].count(False) == 2  # GRPO's claims: reported, not yet gating
