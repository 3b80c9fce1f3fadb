"""GRPO: advantages, the clipped loss with the k3 KL and the Dr. GRPO variant by hand, the rewards, a short run
whose mean reward rises, and exact resume (sampling included)."""

import math
import re

import pytest
import torch

from sparrow import SparrowConfig, SparrowForCausalLM
from sparrow.post_training.grpo import (
    GRPOObjective,
    PromptSource,
    builtin_prompts,
    group_advantages,
    grpo_loss,
    read_prompts,
)
from sparrow.post_training.rewards import (
    WeightedRewards,
    arithmetic_closeness,
    arithmetic_partial,
    exact_answer,
    format_reward,
    resolve_reward,
)
from sparrow.train import Trainer
from sparrow.train import checkpoint as ckpt
from sparrow.train.config import Config
from sparrow.train.metrics import read_metrics


class DigitTokenizer:
    """Digits, the chat's special tokens and one id for every other character: a 13-token vocabulary on which
    a random model emits a given digit often enough for a reward to be found."""

    SPECIALS = ["<|endoftext|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    vocab_size = 16

    def encode(self, text, allowed_special=None):
        ids = []
        for piece in re.split("(" + "|".join(map(re.escape, self.SPECIALS)) + ")", text):
            if piece in self.SPECIALS:
                ids.append(self.SPECIALS.index(piece))
            else:
                ids += [5 + int(c) if c.isdigit() else 15 for c in piece]
        return ids

    def decode(self, ids):
        return "".join(self.SPECIALS[i] if i < 5 else str(i - 5) if i < 15 else "?" for i in ids)

    def token_to_id(self, token):
        return self.SPECIALS.index(token) if token in self.SPECIALS else None


def sevens(prompt, completion, reference):
    """Share of the completion's characters that are 7s (a dense reward a tiny model can learn in steps)."""
    return completion.count("7") / max(len(completion), 1)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return SparrowForCausalLM(SparrowConfig.from_preset("tiny", vocab_size=16, num_hidden_layers=2,
                                                        hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                                        num_key_value_heads=2, max_position_embeddings=64), backend="reference")


# ------------------------------------------------------------------------------------------ advantages, loss

def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # Group 1: mean 0.5, unbiased std sqrt(1/3); group 2: all equal, so no signal.
    std = math.sqrt(1 / 3)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected, rel=1e-6)
    assert group_advantages(rewards, 4, scale=False).tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, 3)


def test_grpo_loss_clipping_and_k3_kl_by_hand():
    # Two completions of two and one tokens (the second's last position is padding).
    logps = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0], [-0.2, 0.0]])
    ref = torch.tensor([[-1.2, -1.0], [-0.5, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -2.0])
    eps, beta = 0.2, 0.1
    # Token (0,0): ratio e^0.5 = 1.649 > 1.2 with A > 0: clipped, surrogate 1.2 * 1 -> clip active.
    # Token (0,1): ratio 1, surrogate 1. Token (1,0): ratio e^-0.3 = 0.741 < 0.8 with A < 0: min(0.741*-2,
    # 0.8*-2) = -1.6 -> clip active.
    k3 = lambda d: math.exp(d) - d - 1  # d = ref - logp
    l00 = -1.2 + beta * k3(-1.2 + 1.0)
    l01 = -1.0 + beta * k3(-1.0 + 2.0)
    l10 = 1.6 + beta * k3(0.0)
    loss, metrics = grpo_loss(logps, old, adv, mask, ref_logps=ref, beta=beta, epsilon=eps)
    assert loss.item() == pytest.approx(((l00 + l01) / 2 + l10) / 2, rel=1e-6)
    assert metrics["clip_fraction"] == pytest.approx(2 / 3)
    assert metrics["kl"] == pytest.approx((k3(-0.2) + k3(1.0) + k3(0.0)) / 3, rel=1e-6)
    # Clipped tokens give no policy gradient; token (0,1) gives -A/2/2 plus its KL gradient.
    loss.backward()
    assert logps.grad[0, 0].item() == pytest.approx(beta * (1 - math.exp(-0.2)) / 4, rel=1e-5)
    assert logps.grad[0, 1].item() == pytest.approx((-1.0 + beta * (1 - math.exp(1.0))) / 4, rel=1e-5)
    assert logps.grad[1, 1].item() == 0.0

    # Dr. GRPO: the masked token sum over completions x max_new_tokens, no KL.
    dr, _ = grpo_loss(logps.detach(), old, adv, mask, variant="dr_grpo", max_new_tokens=4)
    assert dr.item() == pytest.approx((-1.2 - 1.0 + 1.6) / (2 * 4), rel=1e-6)
    with pytest.raises(ValueError, match="variant"):
        grpo_loss(logps, old, adv, mask, variant="ppo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, adv, mask, beta=0.1)


# ----------------------------------------------------------------------------------------------- rewards

def test_reward_functions():
    assert exact_answer("q", "68", "68") == 1.0
    assert exact_answer("q", "68.\nmore", "68") == 1.0  # exact match's own rule: the answer ends at a full stop
    assert exact_answer("q", "86", "68") == 0.0
    assert format_reward("q", "12", "68") == 1.0 and format_reward("q", "12.", "68") == 1.0
    assert format_reward("q", "twelve", "68") == 0.0 and format_reward("q", "12\nand more", "68") == 0.0
    assert format_reward("q", "Paris", "London") == 1.0 and format_reward("q", "", "London") == 0.0
    # Partial credit: integer 0.25, sign 0.25, length 0.25, digits right from the units 0.25 * share.
    assert arithmetic_partial("q", "68", "68") == 1.0
    assert arithmetic_partial("q", "60", "68") == pytest.approx(0.875)
    assert arithmetic_partial("q", "-8", "68") == pytest.approx(0.25 + 0 + 0 + 0.125)
    assert arithmetic_partial("q", "168", "68") == pytest.approx(0.25 + 0.25 + 0 + 0.25)
    assert arithmetic_partial("q", "cat", "68") == 0.0
    assert arithmetic_partial("q", "Paris", "Paris") == 1.0  # a non-numeric reference: exact
    # Closeness: 1 exact, else half of 1 - |error| / max(|reference|, 10); no credit for form.
    assert arithmetic_closeness("q", "68", "68") == 1.0
    assert arithmetic_closeness("q", "72.", "68") == pytest.approx(0.5 * (1 - 4 / 68))
    assert arithmetic_closeness("q", "-3", "-5") == pytest.approx(0.5 * (1 - 2 / 10))
    assert arithmetic_closeness("q", "200", "68") == 0.0 and arithmetic_closeness("q", "cat", "68") == 0.0
    assert arithmetic_closeness("q", "Rome", "Paris") == 0.0 and resolve_reward("closeness") is arithmetic_closeness
    both = WeightedRewards([{"name": "exact", "weight": 2.0}, "format"])
    assert both("q", "68", "68") == 3.0 and both("q", "12", "68") == 1.0
    assert both.describe() == "2 exact + 1 format"
    assert resolve_reward("test_grpo:sevens") is sevens
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        resolve_reward("nope")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_reward("no_such_module_x:f")


def test_prompts_from_jsonl_and_builtin(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "What is 1 plus 2?", "reference": 3}\n\n{"question": "Q", "answer": "A"}\n')
    assert read_prompts(path) == [{"prompt": "What is 1 plus 2?", "reference": "3"}, {"prompt": "Q", "reference": "A"}]
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: needs"):
        read_prompts(path)
    arithmetic = builtin_prompts(tasks=["arithmetic"])
    assert arithmetic and all(re.fullmatch(r"-?\d+", r["reference"]) for r in arithmetic)
    with pytest.raises(ValueError, match="tasks"):
        builtin_prompts(tasks=["poetry"])


# ---------------------------------------------------------------------------------------------- training

def grpo_trainer(out_dir, steps, *, save_every=0, beta=0.0, variant="grpo", updates=1):
    tok = DigitTokenizer()
    config = Config()
    config.train.out_dir = str(out_dir)
    config.train.max_steps, config.train.lr, config.train.warmup_steps = steps, 1e-2, 1
    config.train.save_every, config.train.eval_every, config.train.progress, config.train.plot = save_every, 0, False, True
    config.train.device = "cpu"
    config.data.micro_batch_size, config.data.seq_len = 4, 32
    model = tiny_model()
    data = PromptSource([{"prompt": f"{i}", "reference": "7"} for i in range(12)], tok, updates_per_batch=updates,
                        global_batch=4)
    objective = GRPOObjective.with_reference_copy(model, tok, sevens, group_size=6, max_new_tokens=4, beta=beta,
                                                  variant=variant, updates_per_batch=updates)
    return Trainer(config, data, objective, model=model, log=lambda *a, **k: None)


def test_mean_reward_rises_and_the_reward_curve_is_drawn(tmp_path):
    trainer = grpo_trainer(tmp_path / "run", 12, beta=0.02)
    trainer.fit()
    records = [r for r in read_metrics(tmp_path / "run") if "reward_mean" in r]
    rewards = [r["reward_mean"] for r in records]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards
    assert {"reward_max", "pass@6", "kl", "clip_fraction", "response_length"} <= set(records[-1])
    assert records[-1]["kl"] > 0
    assert (tmp_path / "run" / "reward.png").is_file() and (tmp_path / "run" / "loss.png").is_file()


class Killed(Exception):
    pass


def test_resume_gives_the_same_samples_and_losses(tmp_path, monkeypatch):
    full = grpo_trainer(tmp_path / "full", 6, save_every=3, variant="dr_grpo").fit()
    expected = [r for r in read_metrics(tmp_path / "full") if "reward_mean" in r]

    def kill_after_step_3(variable, step):
        if variable == "SPARROW_TEST_KILL_AFTER_STEP" and step == 3:
            raise Killed

    monkeypatch.setattr(ckpt, "_kill_point", kill_after_step_3)
    with pytest.raises(Killed):
        grpo_trainer(tmp_path / "cut", 6, save_every=3, variant="dr_grpo").fit()
    torch.manual_seed(1234)  # the global RNG plays no part in what is sampled
    resumed = grpo_trainer(tmp_path / "cut", 6, save_every=3, variant="dr_grpo").fit(resume=True)
    assert resumed.losses == {s: full.losses[s] for s in range(4, 7)}
    got = [r for r in read_metrics(tmp_path / "cut") if "reward_mean" in r]
    assert len(got) == len(expected) == 6
    for a, b in zip(got, expected):
        assert {k: v for k, v in a.items() if k not in ("tok_per_s", "elapsed_s")} == \
               {k: v for k, v in b.items() if k not in ("tok_per_s", "elapsed_s")}


def test_updates_per_batch_reuse_one_rollout(tmp_path):
    tok = DigitTokenizer()
    # Prompt positions: with 2 updates and 4 rows a step (micro-batches of 2), steps 0 and 1 read positions 0-3,
    # steps 2 and 3 positions 4-7, so every prompt is still read once per epoch.
    source = PromptSource([{"prompt": f"{i}", "reference": "7"} for i in range(12)], tok, updates_per_batch=2,
                          global_batch=4)
    single = PromptSource([{"prompt": f"{i}", "reference": "7"} for i in range(12)], tok)
    for sample, (position, update) in {0: (0, 0), 2: (2, 0), 4: (0, 1), 6: (2, 1), 8: (4, 0), 14: (6, 1)}.items():
        batch = source.train_batch(sample, 2)
        assert (batch["first_sample"], batch["update"]) == (position, update)
        assert batch["prompts"] == single.train_batch(position, 2)["prompts"]

    # The second update does not sample: it reuses the completions, advantages and the sampling policy's
    # log-probs, so after an optimizer step its loss is the clipped surrogate of the new/old ratio, by hand.
    model = tiny_model()
    objective = GRPOObjective(tok, sevens, group_size=4, max_new_tokens=3, updates_per_batch=2)
    calls = []
    sample = objective.sample
    objective.sample = lambda *a: calls.append(a[2]) or sample(*a)
    first = source.train_batch(0, 2)
    loss0, metrics0 = objective.loss(model, first)
    rollout = objective._rollouts[0]
    old = rollout["old_logps"].clone()
    assert loss0.item() == pytest.approx(0.0, abs=1e-6) and metrics0["clip_fraction"] == 0.0
    assert "reward_mean" in metrics0
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # the policy moves
    loss1, metrics1 = objective.loss(model, source.train_batch(4, 2))
    assert calls == [0] and "reward_mean" not in metrics1 and 0 not in objective._rollouts
    with torch.no_grad():
        from sparrow.post_training.losses import token_logprobs
        new, mask = token_logprobs(model(rollout["ids"]).logits, rollout["labels"])
    adv = rollout["advantages"]
    expected, clipped, tokens = 0.0, 0, 0
    for i in range(new.shape[0]):
        per_token = []
        for t in range(new.shape[1]):
            if mask[i, t]:
                ratio = math.exp(new[i, t] - old[i, t])
                a = float(adv[i])
                per_token.append(-min(ratio * a, min(max(ratio, 0.8), 1.2) * a))
                clipped += (ratio > 1.2 and a > 0) or (ratio < 0.8 and a < 0)
                tokens += 1
        expected += sum(per_token) / len(per_token)
    assert loss1.item() == pytest.approx(expected / new.shape[0], rel=1e-5)
    assert metrics1["clip_fraction"] == pytest.approx(clipped / tokens) and clipped > 0
    with pytest.raises(RuntimeError, match="updates_per_batch"):
        objective.loss(model, source.train_batch(12, 2))  # update 1 of a rollout never generated


def test_updates_per_batch_resume_and_refusals(tmp_path, monkeypatch):
    full = grpo_trainer(tmp_path / "full", 6, save_every=2, updates=2).fit()
    expected = read_metrics(tmp_path / "full")
    assert [r["step"] for r in expected if "reward_mean" in r] == [1, 3, 5]
    assert all("clip_fraction" in r for r in expected if "loss" in r)

    def kill_after_step_4(variable, step):
        if variable == "SPARROW_TEST_KILL_AFTER_STEP" and step == 4:
            raise Killed

    monkeypatch.setattr(ckpt, "_kill_point", kill_after_step_4)
    with pytest.raises(Killed):
        grpo_trainer(tmp_path / "cut", 6, save_every=2, updates=2).fit()
    resumed = grpo_trainer(tmp_path / "cut", 6, save_every=2, updates=2).fit(resume=True)
    assert resumed.losses == {s: full.losses[s] for s in (5, 6)}
    with pytest.raises(ValueError, match="updates_per_batch"):
        GRPOObjective(DigitTokenizer(), sevens, updates_per_batch=0)
    with pytest.raises(ValueError, match="global_batch"):
        PromptSource([{"prompt": "1", "reference": "7"}], DigitTokenizer(), updates_per_batch=2)


def test_bad_options_are_refused():
    tok = DigitTokenizer()
    with pytest.raises(ValueError, match="group_size"):
        GRPOObjective(tok, sevens, group_size=1)
    with pytest.raises(ValueError, match="temperature"):
        GRPOObjective(tok, sevens, temperature=0)
    with pytest.raises(ValueError, match="reference"):
        GRPOObjective(tok, sevens, beta=0.1)
    with pytest.raises(ValueError, match="variant"):
        GRPOObjective(tok, sevens, variant="ppo")
    assert PromptSource([{"prompt": "1", "reference": "7"}], tok).train_batch(5, 2)["references"] == ["7", "7"]


# ---------------------------------------------------------------------------------------------------- CLI

def test_grpo_command_and_the_shipped_config(tmp_path):
    from pathlib import Path

    import yaml

    from sparrow.cli import main
    from sparrow.post_training.stages import load_stage_config
    from sparrow.tokenizer import train_tokenizer

    config, options = load_stage_config("grpo", Path(__file__).parents[1] / "configs" / "grpo_tiny.yaml")
    assert options.data == "builtin" and options.tasks == ["arithmetic"] and config.model.init_from.startswith("runs/")

    start = tmp_path / "start"
    train_tokenizer(["What is 2 plus 3? 5. 问题：3 加 4 等于多少？ 7。"] * 20, vocab_size=300, out_dir=start,
                    show_progress=False)
    torch.manual_seed(0)
    SparrowForCausalLM(SparrowConfig.from_preset("tiny", vocab_size=300, num_hidden_layers=1, hidden_size=64,
                                                 intermediate_size=128, max_position_embeddings=64)).save_pretrained(start)
    (tmp_path / "p.jsonl").write_text("".join(f'{{"prompt": "What is {a} plus 1?", "reference": "{a + 1}"}}\n'
                                              for a in range(6)))
    values = {"model": {"init_from": str(start), "backend": "reference"}, "data": {"seq_len": 64, "micro_batch_size": 2},
              "train": {"out_dir": str(tmp_path / "grpo"), "max_steps": 2, "warmup_steps": 1, "eval_every": 0,
                        "save_every": 0, "progress": False},
              "grpo": {"data": str(tmp_path / "p.jsonl"), "rewards": [{"name": "arithmetic", "weight": 2}, "format"],
                       "group_size": 3, "max_new_tokens": 3, "beta": 0.05}}
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(values))
    assert main(["grpo", "--config", str(tmp_path / "grpo.yaml"), "grpo.variant=dr_grpo"]) == 0
    records = [r for r in read_metrics(tmp_path / "grpo") if "reward_mean" in r]
    assert [r["step"] for r in records] == [1, 2] and all(0 <= r["reward_mean"] <= 3 for r in records)
    assert all(r["response_length"] <= 3 and "kl" in r for r in records)
    assert (tmp_path / "grpo" / "reward.png").is_file() and (tmp_path / "grpo" / "model" / "tokenizer.json").is_file()
    assert main(["grpo", "--config", str(tmp_path / "grpo.yaml"), "grpo.rewards=[nope]"]) == 2
    # Two optimizer steps on one generated batch: the rewards are logged once, on the step that samples.
    assert main(["grpo", "--config", str(tmp_path / "grpo.yaml"), "grpo.updates_per_batch=2",
                 f"train.out_dir={tmp_path / 'twice'}"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "twice") if "reward_mean" in r] == [1]
    with pytest.raises(ValueError, match="train.max_steps: 2 is not a multiple of grpo.updates_per_batch"):
        from sparrow.post_training.stages import build_grpo
        build_grpo(*load_stage_config("grpo", tmp_path / "grpo.yaml", ["grpo.updates_per_batch=3"]))
