"""sparrow.train: configs, the loop, exact resume after SIGKILL, DDP/FSDP2 under torchrun (gloo), divergence,
and the errors reported before training starts."""

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparrow import SparrowForCausalLM
from sparrow.data.token_file import write_token_file
from sparrow.train import NonFiniteLossError, build_pretraining, load_config
from sparrow.train.checkpoint import list_checkpoints
from sparrow.train.config import Config, valid_keys
from sparrow.train.metrics import read_metrics
from sparrow.train.trainer import CausalLMObjective

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64


def make_tokens(path: Path, num_docs: int = 300, seed: int = 0) -> Path:
    """Documents that count upwards modulo VOCAB - 1 from a random start: learnable from context, while their
    unigram distribution is nearly uniform."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        start, length = rng.integers(0, VOCAB - 1), rng.integers(5, 40)
        docs.append(((start + np.arange(length)) % (VOCAB - 1)).tolist())
    write_token_file(path, docs, vocab_size=VOCAB, eot_id=VOCAB - 1, source="test")
    return path


def small_overrides(tokens: Path, out_dir: Path, **extra) -> list[str]:
    values = {
        "model.vocab_size": VOCAB, "model.hidden_size": 32, "model.intermediate_size": 64,
        "model.num_hidden_layers": 2, "model.num_attention_heads": 4, "model.num_key_value_heads": 2,
        "model.max_position_embeddings": 64, "data.source": str(tokens), "data.seq_len": 32,
        "data.micro_batch_size": 4, "data.val_fraction": 0.05, "train.out_dir": str(out_dir), "train.max_steps": 10,
        "train.lr": 1e-2, "train.warmup_steps": 2, "train.save_every": 4, "train.eval_every": 0,
        "train.progress": False, "train.plot": False, **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


RUNNER = """
import sys
from sparrow.train import distributed
from sparrow.train.config import load_config
from sparrow.train.pretrain import pretrain
try:
    pretrain(load_config(None, sys.argv[2:]), resume=sys.argv[1] == "resume", log=lambda *a, **k: None)
finally:
    distributed.shutdown()
"""


def run_subprocess(tmp_path: Path, mode: str, overrides: list[str], env: dict | None = None, nproc: int = 1):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    if nproc == 1:
        cmd = [sys.executable, str(script), mode, *overrides]
    else:
        full_env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), mode, *overrides]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


# --------------------------------------------------------------------------------------------------- config

def test_default_config_is_the_tiny_yaml_and_every_config_loads():
    assert load_config(ROOT / "configs" / "pretrain_tiny.yaml").to_dict() == Config().to_dict()
    for path in sorted((ROOT / "configs").glob("pretrain_*.yaml")):
        config = load_config(path)
        assert config.data.seq_len <= config.model.model_config().max_position_embeddings
    big = load_config(ROOT / "configs" / "pretrain_124m.yaml")
    assert big.model.preset == "124m" and big.train.precision == "bf16" and big.model.compile


def test_overrides_are_typed_and_unknown_keys_list_the_valid_ones(tmp_path):
    config = load_config(None, ["train.lr=3e-4", "model.compile=true", "data.seq_len=128", "model.init_from=null"])
    assert config.train.lr == 3e-4 and config.model.compile is True and config.data.seq_len == 128
    with pytest.raises(ValueError, match=r"unknown key 'train\.lrr'.*'train\.lr'"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ValueError, match="data.seq_len: expected int"):
        load_config(None, ["data.seq_len=long"])
    with pytest.raises(ValueError, match=r"data.seq_len: 1024 exceeds the model's context"):
        load_config(None, ["data.seq_len=1024"])
    with pytest.raises(ValueError, match="train.precision"):
        load_config(None, ["train.precision=fp8"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown key 'train\.learning_rate'; valid keys are"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    assert "model.preset" in valid_keys() and "train.out_dir" in valid_keys()


def _pretrain_cli(argv):
    from sparrow.cli import training as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_takes_set_and_positional_overrides(capsys):
    assert _pretrain_cli(["pretrain", "--set", "train.lr=0.5", "train.max_steps=7", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.5" in printed and "max_steps: 7" in printed


# ------------------------------------------------------------------------------------------------- training

def test_loss_falls_below_unigram_entropy_and_outputs_are_written(tmp_path):
    tokens = make_tokens(tmp_path / "tokens")
    config = load_config(None, small_overrides(tokens, tmp_path / "run", **{"train.max_steps": 40, "train.plot": True,
                                                                          "train.eval_every": 20}))
    trainer = build_pretraining(config, log=lambda *a, **k: None)
    result = trainer.fit()
    tail = np.mean(list(result.losses.values())[-5:])
    assert trainer.unigram_entropy > 4.0  # nearly uniform over 63 symbols
    assert tail < 0.5 * trainer.unigram_entropy
    assert result.val_loss is not None and result.val_loss < 0.5 * trainer.unigram_entropy
    run = tmp_path / "run"
    records = read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))
    assert {"lr", "grad_norm", "tokens", "tok_per_s"} <= set(records[0])
    assert [r["step"] for r in records if "val_loss" in r] == [20, 40]
    assert (run / "loss.png").stat().st_size > 1000
    assert [p.name for p in list_checkpoints(run)] == ["step_00000036", "step_00000040"]  # keep_checkpoints = 2
    assert load_config(run / "checkpoints" / "step_00000040" / "config.yaml").to_dict() == config.to_dict()
    # The exported model is the trained one.
    model = SparrowForCausalLM.from_pretrained(run / "model")
    batch = trainer.data.val_batch(0, 2)
    expected = trainer.raw_model.eval()(batch["input_ids"], labels=batch["labels"]).loss
    assert model(batch["input_ids"], labels=batch["labels"]).loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert model.config.eos_token_id == VOCAB - 1


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 10-step run, in this process (CPU kernels with the same thread count are deterministic,
    so the subprocess runs compared with it must match bit for bit)."""
    tmp = tmp_path_factory.mktemp("reference")
    tokens = make_tokens(tmp / "tokens")
    build_pretraining(load_config(None, small_overrides(tokens, tmp / "run")), log=lambda *a, **k: None).fit()
    return tokens, losses(tmp / "run")


@pytest.mark.parametrize("kill_var", ["SPARROW_TEST_KILL_AFTER_STEP", "SPARROW_TEST_KILL_DURING_SAVE"])
def test_resume_after_sigkill_gives_identical_losses(tmp_path, reference_run, kill_var):
    tokens, expected = reference_run
    out = tmp_path / "run"
    # Killed after step 7 (checkpoint at 4; steps 5-7 are recomputed), or in the middle of writing step 8's.
    step = "7" if kill_var.endswith("AFTER_STEP") else "8"
    killed = run_subprocess(tmp_path, "fresh", small_overrides(tokens, out), env={kill_var: step})
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(out)] == ["step_00000004"]  # a half-written one is not listed
    if kill_var.endswith("SAVE"):
        assert [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp_step_00000008")]
    resumed = run_subprocess(tmp_path, "resume", small_overrides(tokens, out))
    assert resumed.returncode == 0, resumed.stderr
    assert losses(out) == expected  # exact, every step
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000008", "step_00000010"]  # no leftovers


@pytest.mark.parametrize("strategy,micro,accum", [("ddp", 1, 2), ("fsdp", 2, 1)])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, reference_run, strategy, micro, accum):
    tokens, expected = reference_run  # one process, 4 rows per step
    out = tmp_path / "run"
    extra = {"train.distributed": strategy, "data.micro_batch_size": micro, "data.grad_accum": accum}
    done = run_subprocess(tmp_path, "fresh", small_overrides(tokens, out, **extra), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    got = losses(out)
    assert list(got) == list(expected)
    np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=2e-5, atol=1e-6)
    # The checkpoint holds full (unsharded) weights whatever the strategy.
    model = SparrowForCausalLM.from_pretrained(out / "model")
    assert model.model.embed_tokens.weight.shape == (VOCAB, 32)


class NaNAtStep(CausalLMObjective):
    def __init__(self, step: int):
        self.step, self.calls = step, 0

    def loss(self, model, batch):
        self.calls += 1
        loss, metrics = super().loss(model, batch)
        return (loss * float("nan") if self.calls == self.step else loss), metrics


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    tokens = make_tokens(tmp_path / "tokens")
    config = load_config(None, small_overrides(tokens, tmp_path / "run"))
    trainer = build_pretraining(config, log=lambda *a, **k: None)
    trainer.objective = NaNAtStep(6)
    with pytest.raises(NonFiniteLossError, match=r"step 6: non-finite loss.*step_00000004.*--resume"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000004"]
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())


def test_bad_input_fails_before_training(tmp_path):
    tokens = make_tokens(tmp_path / "tokens")
    quiet = dict(log=lambda *a, **k: None)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        build_pretraining(load_config(None, small_overrides(tmp_path / "missing", tmp_path / "r")), **quiet)
    write_token_file(tmp_path / "empty", [], vocab_size=VOCAB, eot_id=VOCAB - 1)
    with pytest.raises(ValueError, match="empty"):
        build_pretraining(load_config(None, small_overrides(tmp_path / "empty", tmp_path / "r")), **quiet)
    with pytest.raises(ValueError, match="model.vocab_size: 32 is smaller than the token file's vocabulary"):
        build_pretraining(load_config(None, small_overrides(tokens, tmp_path / "r", **{"model.vocab_size": 32})), **quiet)
    with pytest.raises(ValueError, match="data.seq_len: 128 exceeds the model's context"):
        load_config(None, small_overrides(tokens, tmp_path / "r", **{"data.seq_len": 128}))
    with pytest.raises(ValueError, match="--resume: no checkpoint"):
        build_pretraining(load_config(None, small_overrides(tokens, tmp_path / "r")), **quiet).fit(resume=True)
    config = load_config(None, small_overrides(tokens, tmp_path / "r", **{"train.max_steps": 4}))
    build_pretraining(config, **quiet).fit()
    with pytest.raises(ValueError, match="already has checkpoints.*--resume"):
        build_pretraining(config, **quiet).fit()
    changed = load_config(None, small_overrides(tokens, tmp_path / "r", **{"model.hidden_size": 64}))
    with pytest.raises(ValueError, match=r"--resume: the model .* differs from the config in \['head_dim', 'hidden_size'"):
        build_pretraining(changed, **quiet).fit(resume=True)


def test_builtin_corpus_pipeline_end_to_end(tmp_path):
    """`sparrow pretrain` on the built-in corpus, shrunk: tokenizer training, token file, training, export."""
    overrides = small_overrides(Path("unused"), tmp_path / "run", **{
        "data.source": "builtin", "data.cache_dir": str(tmp_path / "cache"), "data.builtin_python_docs": False,
        "data.builtin_arithmetic_docs": 60, "data.builtin_num_people": 20, "model.vocab_size": 512,
        "train.max_steps": 6, "train.plot": True})
    assert _pretrain_cli(["pretrain", *overrides]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 6 and summary["unigram_entropy"] > 3
    assert (run / "model" / "tokenizer.json").is_file() and (run / "loss.png").is_file()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(run / "model" / "tokenizer.json"))
    assert tokenizer.decode(tokenizer.encode("3 加 5 等于 8。").ids) == "3 加 5 等于 8。"
    assert SparrowForCausalLM.from_pretrained(run / "model").config.vocab_size == 512
    # Later runs reuse the prepared corpus instead of training another tokenizer.
    from sparrow.train.builtin_data import prepare_builtin

    messages = []
    again = prepare_builtin(tmp_path / "cache", vocab_size=512, python_docs=False, arithmetic_docs=60, num_people=20,
                            log=messages.append)
    assert messages == [] and len(list((tmp_path / "cache").iterdir())) == 1
    assert json.loads((run / "config.yaml").parent.joinpath("summary.json").read_text())["tokens"] == 6 * 4 * 32
    assert again.tokens.with_suffix(".bin").is_file()


def test_accumulation_and_activation_checkpointing_do_not_change_the_run(tmp_path):
    tokens = make_tokens(tmp_path / "tokens")
    quiet = dict(log=lambda *a, **k: None)
    base = {"train.max_steps": 3, "train.save_every": 0}
    plain = build_pretraining(load_config(None, small_overrides(tokens, tmp_path / "a", **base)), **quiet).fit()
    split = {**base, "data.micro_batch_size": 2, "data.grad_accum": 2, "model.gradient_checkpointing": True}
    other = build_pretraining(load_config(None, small_overrides(tokens, tmp_path / "b", **split)), **quiet).fit()
    np.testing.assert_allclose(list(other.losses.values()), list(plain.losses.values()), rtol=1e-5)


def test_resume_drops_metrics_past_the_checkpoint_and_a_cut_last_line(tmp_path):
    from sparrow.train.metrics import MetricsLog

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "val_loss": 1.5}\n'
                                            '{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    MetricsLog(tmp_path).truncate_after(2)
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "val_loss": 1.5}]


# ------------------------------------------------------------------------------------------ mixture of experts

def moe_overrides(tokens: Path, out_dir: Path, **extra) -> list[str]:
    return small_overrides(tokens, out_dir, **{"model.preset": "moe-tiny", "model.num_local_experts": 4,
                                               "model.moe_intermediate_size": 32, **extra})


def test_moe_pretraining_logs_router_metrics_and_resumes_exactly(tmp_path):
    """The router is trained state like any other: a run killed after step 7 and resumed from step 4's checkpoint
    repeats the uninterrupted run's losses and per-expert counts exactly."""
    tokens = make_tokens(tmp_path / "tokens")
    reference = tmp_path / "reference"
    build_pretraining(load_config(None, moe_overrides(tokens, reference, **{"train.plot": True})),
                      log=lambda *a, **k: None).fit()
    records = [r for r in read_metrics(reference) if "loss" in r]
    assert {"aux_loss", "z_loss", "expert_max_min", "expert_max_min/0", "expert_max_min/1",
            *(f"expert_tokens/{e}" for e in range(4))} <= set(records[0])
    assert all(r["expert_max_min"] == max(r["expert_max_min/0"], r["expert_max_min/1"]) for r in records)
    # Every step routes each of the 4 x 32 tokens to 2 experts in each of the 2 MoE layers.
    assert all(sum(r[f"expert_tokens/{e}"] for e in range(4)) == 4 * 32 * 2 * 2 for r in records)
    assert (reference / "loss.png").stat().st_size > 1000
    out = tmp_path / "run"
    killed = run_subprocess(tmp_path, "fresh", moe_overrides(tokens, out), env={"SPARROW_TEST_KILL_AFTER_STEP": "7"})
    assert killed.returncode == -signal.SIGKILL
    resumed = run_subprocess(tmp_path, "resume", moe_overrides(tokens, out))
    assert resumed.returncode == 0, resumed.stderr

    def untimed(run: Path) -> list[dict]:
        timing = {"elapsed_s", "tok_per_s"}
        return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(run) if "loss" in r]

    assert untimed(out) == untimed(reference)  # losses, router losses and expert counts, every step
    model = SparrowForCausalLM.from_pretrained(out / "model")
    assert model.config.num_local_experts == 4 and model.config.model_type == "mixtral"
