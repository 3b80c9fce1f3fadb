#!/usr/bin/env python3
"""How much training a preset needs before it can add and subtract two-digit numbers it has never seen: the
learning curve behind the demo's GRPO claim.

GRPO can only reinforce answers it samples. The demo's starting model answers ~1-3% of held-out two-digit sums
and differences, so the question is how much plain training the skill costs. This script measures it in the most
favourable setting there is: the preset trained from scratch on nothing but arithmetic, one character per token
(``23+45=68`` lines packed into rows, ~10 tokens a problem, so ~25 problems per 256-token row), every operand
pair of 10-99 except the demo's held-out ones (:func:`sparrow.data.builtin_corpus.heldout_operand_pairs`, the
pairs whose sums and differences are most of the demo's 240 held-out items). Every ``--eval-every`` steps it
answers all held-out sums and differences (238 for seed 0) greedily and prints exact match with the CPU and
wall seconds so far. The demo's pretraining steps have this size (8 x 256 tokens) but spend them on much besides
(prose, facts, reading, then the chat format and four stages), so the curve is a floor on what the skill costs it.

    python benchmarks/bench_arithmetic.py                # tiny preset, 2000 steps of 8 x 256 tokens (~10 CPU min)
    python benchmarks/bench_arithmetic.py --quick        # 40 steps (checks the script, learns nothing yet)

Writes benchmarks/results/<device>/arithmetic.json ({"meta", "rows", "plot"}).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device_info, print_table, write_results  # noqa: E402
from sparrow.data.builtin_corpus import heldout_operand_pairs  # noqa: E402
from sparrow.model import SparrowConfig, SparrowForCausalLM, causal_lm_loss  # noqa: E402
from sparrow.train.config import Config, TrainSection  # noqa: E402
from sparrow.train.trainer import build_optimizer, lr_lambda  # noqa: E402

ALPHABET = "0123456789+-=\n"
TOKEN = {c: i for i, c in enumerate(ALPHABET)}


def problem_line(op: str, a: int, b: int) -> str:
    return f"{a}{op}{b}={a + b if op == '+' else a - b}\n"


def training_lines(seed: int, heldout: set[tuple[int, int]]):
    """Endless random problems (sum, or difference with a >= b) on operand pairs of 10-99 not held out."""
    rng = random.Random(f"bench-arithmetic-{seed}")
    while True:
        op, a, b = rng.choice("+-"), rng.randint(10, 99), rng.randint(10, 99)
        if op == "-" and a < b:
            a, b = b, a
        if tuple(sorted((a, b))) not in heldout:
            yield problem_line(op, a, b)


def heldout_problems(heldout: set[tuple[int, int]]) -> list[tuple[str, str]]:
    """(prompt, answer) for the sum and the difference of every held-out pair: the demo's held-out arithmetic
    minus its few products (119 pairs for seed 0: 238 problems)."""
    problems = []
    for a, b in sorted(heldout):
        problems.append((f"{a}+{b}=", str(a + b)))
        problems.append((f"{b}-{a}=", str(b - a)))
    return problems


@torch.no_grad()
def heldout_exact_match(model: SparrowForCausalLM, problems: list[tuple[str, str]]) -> dict[str, float]:
    """Greedy answers (up to the newline) of every problem; exact match overall and per operation."""
    model.eval()
    x = torch.tensor([[TOKEN["\n"]] + [TOKEN[c] for c in prompt] for prompt, _ in problems])  # equal lengths
    start = x.shape[1]
    for _ in range(4):  # at most three digits and the newline
        x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    right = {"+": [], "-": []}
    for row, (prompt, answer) in zip(x[:, start:].tolist(), problems):
        text = "".join(ALPHABET[i] for i in row).split("\n")[0]
        right["+" if "+" in prompt else "-"].append(text == answer)
    model.train()
    both = right["+"] + right["-"]
    return {"exact_match": sum(both) / len(both), "add": sum(right["+"]) / len(right["+"]),
            "sub": sum(right["-"]) / len(right["-"])}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=3e-3, help="peak (the demo's pretraining lr)")
    p.add_argument("--batch", type=int, default=8, help="rows per step (the demo's pretraining micro-batch)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="the world whose held-out pairs are excluded, and the data")
    p.add_argument("--quick", action="store_true", help="40 steps, evaluated every 20")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/arithmetic.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every = min(args.steps, 40), min(args.eval_every, 20)
    for name in ("steps", "batch", "seq_len", "eval_every", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    heldout = heldout_operand_pairs(args.seed)["add"]  # the same unordered pairs serve "sub"
    problems = heldout_problems(heldout)
    lines = training_lines(args.seed, heldout)
    model = SparrowForCausalLM(SparrowConfig.from_preset(args.preset, vocab_size=len(ALPHABET)))
    # The trainer's AdamW (decay on matrices only, betas 0.9/0.95), unfused as when the committed curve was measured.
    optimizer = build_optimizer(model, Config(train=TrainSection(lr=args.lr, fused_adamw=False)), torch.device("cpu"))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(min(100, args.steps // 10 + 1), args.steps, 0.1))

    def next_batch() -> torch.Tensor:
        """[batch, seq_len + 1] ids: seq_len predictions per row."""
        rows = []
        for _ in range(args.batch):
            text = ""
            while len(text) <= args.seq_len:
                text += next(lines)
            rows.append([TOKEN[c] for c in text[:args.seq_len + 1]])
        return torch.tensor(rows)

    rows, cpu0, wall0 = [], time.process_time(), time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = next_batch()
        loss = causal_lm_loss(model(ids).logits, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            row = {"preset": args.preset, "step": step, "problems_seen": step * args.batch * args.seq_len // 10, "loss": loss.item(),
                   **heldout_exact_match(model, problems), "cpu_s": cpu, "wall_s": wall}
            rows.append(row)
            print(f"step {step}: loss {row['loss']:.3f}, held-out exact match {row['exact_match']:.3f} "
                  f"(add {row['add']:.3f}, sub {row['sub']:.3f}), {cpu:.0f} CPU s", flush=True)
    print()
    print_table(rows, ["step", "problems_seen", "loss", "exact_match", "add", "sub", "cpu_s", "wall_s"])
    meta = {**device_info(), "preset": args.preset, "parameters": sum(p.numel() for p in model.parameters()),
            "lr": args.lr, "batch": args.batch, "seq_len": args.seq_len, "threads": args.threads, "seed": args.seed,
            "heldout_items": len(problems)}
    path = write_results("arithmetic", rows, meta, out=args.out,
                         plot={"x": "step", "series": "preset", "y": ["exact_match", "loss"]})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
