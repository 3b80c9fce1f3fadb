"""The arithmetic learning-curve benchmark measures what it says: no held-out pair in its training lines, the
demo's held-out sums and differences with right answers, and a JSON of the curve."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

from benchmarks import bench_arithmetic as ba
from sparrow.data.builtin_corpus import heldout_operand_pairs


def test_training_lines_never_state_a_heldout_pair_and_are_right():
    heldout = heldout_operand_pairs(0)["add"]
    seen = set()
    for line in itertools.islice(ba.training_lines(0, heldout), 20000):
        left, answer = line.rstrip("\n").split("=")
        op = "+" if "+" in left else "-"
        a, b = map(int, left.split(op))
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert int(answer) == (a + b if op == "+" else a - b) and int(answer) >= 0
        assert tuple(sorted((a, b))) not in heldout
        seen.add(tuple(sorted((a, b))))
    assert len(seen) > 3000  # the drill covers most of the ~4,000 other pairs


def test_heldout_problems_are_the_sums_and_differences_of_the_demos_heldout_pairs():
    heldout = heldout_operand_pairs(0)["add"]
    problems = ba.heldout_problems(heldout)
    assert len(problems) == 2 * len(heldout) >= 230
    for prompt, answer in problems:
        op = "+" if "+" in prompt else "-"
        a, b = map(int, prompt.rstrip("=").split(op))
        assert tuple(sorted((a, b))) in heldout
        assert int(answer) == (a + b if op == "+" else a - b) and int(answer) >= 0


def test_quick_run_writes_the_curve(tmp_path):
    # A process of its own: the script sets torch's thread count and seed, which would leak into later tests
    # (a different thread count changes the last bits of the in-process reference of the exact-resume tests).
    out = tmp_path / "arithmetic.json"
    script = Path(ba.__file__)
    proc = subprocess.run([sys.executable, str(script), "--quick", "--seq-len", "32", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert [r["step"] for r in data["rows"]] == [20, 40]
    assert data["meta"]["heldout_items"] == 2 * len(heldout_operand_pairs(0)["add"])
    for row in data["rows"]:
        assert 0.0 <= row["exact_match"] <= 1.0 and row["loss"] > 0
