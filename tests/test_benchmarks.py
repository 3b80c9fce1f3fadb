"""The benchmark runner end to end on the training benchmark's quick mode, and the `sparrow bench` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparrow import bench_cli, cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_train_benchmark_writes_results_and_plot(tmp_path):
    # One thread: this checks the pipeline, not the speed, and two OpenMP threads spin-waiting against the other
    # jobs of a shared 2-core CI machine make it several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "train", "--results", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "train.json").read_text())
    meta = data["meta"]
    for key in ("device", "commit", "date"):
        assert meta[key], key
    assert meta["torch"]
    timed = [r for r in data["rows"] if r["kind"] == "train" and r["status"] == "ok"]
    assert {r["variant"] for r in timed} >= {"reference", "reference+compile", "auto packed"}
    assert all(r["tokens_per_s"] > 0 for r in timed)
    # Every variant that ran started from the reference's weights and batch, so its first loss is the reference's.
    assert all(r["first_loss"] == pytest.approx(r["reference_loss"], rel=1e-3) for r in timed)
    assert all(r.get("reason") for r in data["rows"] if r["status"] == "skipped")
    # The transformers model, patched by sparrow.patch, starts from the unpatched model's loss (CPU: checked only).
    hf_rows = {r["variant"]: r for r in data["rows"] if r["variant"].startswith("hf ")}
    assert hf_rows["hf patched auto"]["status"] == "checked"
    assert hf_rows["hf patched auto"]["first_loss"] == pytest.approx(hf_rows["hf sdpa"]["first_loss"], rel=1e-4)
    png = tmp_path / "train.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sparrow_bench_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--only" in out and "--results" in out
    assert "train" in out  # the benchmarks found in the checkout are listed as --only's choices


def test_sparrow_bench_forwards_flags_to_the_runner(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.__main__ as runner

    seen = []
    monkeypatch.setattr(runner, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["bench", "--quick", "--only", "train", "--only", "bpe", "--results", str(tmp_path)]) == 0
    assert seen == [["--quick", "--only", "train", "--only", "bpe", "--results", str(tmp_path)]]


def test_sparrow_bench_outside_a_checkout_says_why(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_cli, "SOURCE_ROOT", tmp_path)
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "sparrow bench: error:" in err and "source tree" in err
