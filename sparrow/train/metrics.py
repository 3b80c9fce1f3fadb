"""Run logging: a JSON-lines metrics file, the progress bar's numbers (tokens/s, MFU) and the loss-curve plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s by GPU name, for MFU; unknown GPUs get no MFU rather than a wrong one.
_PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in _PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def flops_per_token(num_parameters: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward and backward matmuls) plus attention's scores and
    weighted sum, 12 * layers * hidden * context (PaLM's appendix B). Packed documents attend over less than
    ``seq_len``, so this slightly overstates the work: MFU errs low."""
    return 6 * num_parameters + 12 * num_layers * hidden_size * seq_len


class MetricsLog:
    """Appends one JSON object per line to ``<out_dir>/metrics.jsonl`` and flushes it, so a killed run keeps
    everything up to its last step."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True):
        self.path = Path(out_dir) / METRICS_FILE
        self.enabled = enabled
        self._file = None

    def truncate_after(self, step: int) -> None:
        """Drop entries past ``step``: a resumed run recomputes them, and the file should tell one history."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run may be cut short
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def reset(self) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(curves: dict[str, list[tuple[int, float]]], out_png: str | os.PathLike, *, ylabel: str, title: str,
                styles: dict[str, str] | None = None, baseline: tuple[float, str] | None = None,
                panel: Callable[[Any], None] | None = None) -> Path:
    """Curves per step (label -> [(step, value)]) in one figure, with an optional horizontal baseline
    (value, label); written atomically. Empty curves are left out. ``panel(ax)`` draws a second panel below."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    if panel is not None:
        fig, (ax, lower) = plt.subplots(2, 1, figsize=(7, 7), dpi=110)
        panel(lower)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, points in curves.items():
        if points:
            style = (styles or {}).get(label, "-")
            ax.plot(*zip(*points), style, ms=4, lw=1, alpha=0.85, label=label)
    if baseline is not None:
        ax.axhline(baseline[0], color="grey", ls="--", lw=1, label=baseline[1])
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def plot_loss(metrics_path: str | os.PathLike, out_png: str | os.PathLike, *, unigram_entropy: float | None = None,
              title: str = "training loss") -> Path:
    """Training loss per step (and validation loss where measured) against the unigram-entropy baseline; for a
    mixture-of-experts run a second panel shows each expert's share of the routed tokens per step."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    baseline = None if unigram_entropy is None else (unigram_entropy, f"unigram entropy ({unigram_entropy:.2f})")
    experts = sorted({k for r in records for k in r if k.startswith("expert_tokens/")}, key=lambda k: int(k.split("/")[1]))

    def expert_shares(ax) -> None:
        shares = [(r["step"], [r[k] / max(sum(r[j] for j in experts), 1e-9) for k in experts])
                  for r in records if all(k in r for k in experts)]
        if shares:
            steps = [s for s, _ in shares]
            for i, key in enumerate(experts):
                ax.plot(steps, [share[i] for _, share in shares], lw=1, label=key.split("/")[1])
            ax.axhline(1 / len(experts), color="grey", ls="--", lw=1, label="balanced")
        ax.set_xlabel("step")
        ax.set_ylabel("share of routed tokens")
        ax.set_title("tokens per expert")
        ax.grid(alpha=0.3)
        ax.legend(ncol=5, fontsize=7)

    return plot_curves({"train loss": train, "validation loss": val}, out_png, ylabel="loss (nats/token)",
                       title=title, styles={"validation loss": "o-"}, baseline=baseline,
                       panel=expert_shares if experts else None)

