"""The training loop shared by pretraining, SFT and DPO; what differs between them plugs in as an
:class:`Objective` (the loss of a batch) and a :class:`BatchSource` (which rows a sample position reads).

What the loop guarantees:

* **Exact resume.** Everything a step depends on is either in the checkpoint (weights, AdamW moments, schedule,
  RNG states) or a pure function of it (the batch of a step is a function of the data seed and the number of
  samples consumed), so a run killed at any point and resumed gives the same per-step losses, bit for bit on CPU.
* **Same result on any number of ranks.** A step reads one global batch of ``micro_batch * grad_accum * world``
  rows; each micro-batch's loss is weighted by its share of the global batch's target tokens (counted up front
  and all-reduced), so the gradient is that of the global token mean whatever the split between ranks and
  accumulation steps.
* **No silent divergence.** A non-finite loss or gradient norm stops the run before the optimizer step, and the
  last checkpoint is the last good state.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..model import IGNORE_INDEX, MoeMLP, SparrowForCausalLM, patch
from . import checkpoint as ckpt
from . import distributed
from .config import Config
from .metrics import MetricsLog, flops_per_token, peak_flops, plot_loss


@runtime_checkable
class Objective(Protocol):
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """The batch's mean loss (a scalar the loop backpropagates) and extra numbers to log."""
        ...

    # Optional: ``weight(batch) -> float``, how many units the loss averages over (target tokens, pairs). The loop
    # then weights micro-batches and ranks by it, making accumulation and data parallelism exact; without it
    # every micro-batch counts the same.


class BatchSource(Protocol):
    def train_batch(self, first_sample: int, count: int) -> dict[str, Any]: ...

    # Optional: ``num_val_samples`` and ``val_batch(first_sample, count)`` for the validation loss.


class CausalLMObjective:
    """Next-token cross-entropy over (packed) batches: ``input_ids``, ``labels``, optional ``cu_seqlens`` and
    ``max_seqlen``."""

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        out = model(batch["input_ids"], labels=batch["labels"], cu_seqlens=batch.get("cu_seqlens"),
                    max_seqlen=batch.get("max_seqlen"))
        return out.loss, router_metrics(out)

    def weight(self, batch: dict[str, Any]) -> float:
        return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def router_metrics(out: Any) -> dict[str, float]:
    """What a mixture-of-experts forward logs (nothing for a dense model): its two router losses, the tokens each
    expert received summed over the MoE layers (``expert_tokens/<e>``), each MoE layer's max/min ratio of tokens
    per expert (``expert_max_min/<layer>``, counting the MoE layers from 0) and the worst of them
    (``expert_max_min``)."""
    counts = getattr(out, "expert_counts", None)
    if counts is None:
        return {}
    metrics = {"aux_loss": float(out.aux_loss.detach()), "z_loss": float(out.z_loss.detach())}
    counts = counts.detach().cpu()
    for e, n in enumerate(counts.sum(0).tolist()):
        metrics[f"expert_tokens/{e}"] = float(n)
    ratio = counts.max(1).values.double() / counts.min(1).values.clamp_min(1).double()
    for layer, r in enumerate(ratio.tolist()):
        metrics[f"expert_max_min/{layer}"] = r
    metrics["expert_max_min"] = float(ratio.max())
    return metrics


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # per step, as run by this process
    val_loss: float | None = None
    last_checkpoint: Path | None = None
    wall_s: float = 0.0
    tokens: int = 0


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def lr_lambda(warmup_steps: int, max_steps: int, min_ratio: float):
    """Linear warmup to the peak over ``warmup_steps``, then a cosine down to ``min_ratio`` of it at
    ``max_steps``. ``s`` counts optimizer steps already taken (0 for the first)."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = min(1.0, (s - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: nn.Module, config: Config, device: torch.device) -> torch.optim.Optimizer:
    t = config.train
    # Weight decay on matrices only: decaying norm gains pulls them towards zero for no regularising benefit.
    # MoE routers get their own group at lr * router_lr_scale (see TrainSection.router_lr_scale).
    routers = [m.gate.weight for m in model.modules() if isinstance(m, MoeMLP) and m.gate.weight.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad and all(p is not r for r in routers)]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if routers:
        groups.append({"params": routers, "weight_decay": t.weight_decay, "lr": t.lr * t.router_lr_scale})
    kwargs = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    fused = t.fused_adamw if t.fused_adamw is not None else device.type in ("cuda", "cpu")
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            if t.fused_adamw:  # asked for explicitly: say why not
                raise
    return torch.optim.AdamW(groups, **kwargs)


def _autocast(config: Config, device: torch.device):
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def build_model(config: Config, info: distributed.DistInfo, **model_fields: Any) -> SparrowForCausalLM:
    m = config.model
    torch.manual_seed(config.train.seed)  # same initial weights on every rank and every run
    if m.init_from:
        model = SparrowForCausalLM.from_pretrained(m.init_from)
    else:
        model = SparrowForCausalLM(m.model_config(**model_fields))
    patch(model, m.backend)
    model.model.gradient_checkpointing = m.gradient_checkpointing
    return model.to(info.device)


class Trainer:
    """One run: ``Trainer(config, data, objective).fit(resume=...)``. ``data`` is a :class:`BatchSource`;
    :func:`sparrow.train.pretrain.pretrain` builds the pretraining one from the config."""

    def __init__(self, config: Config, data: BatchSource, objective: Objective | None = None, *,
                 info: distributed.DistInfo | None = None, model: SparrowForCausalLM | None = None,
                 model_fields: dict[str, Any] | None = None, log=print, header: dict[str, Any] | None = None,
                 extra_files: dict[str, Path] | None = None, unigram_entropy: float | None = None):
        config.validate()
        self.config = config
        self.data = data
        self.objective = objective or CausalLMObjective()
        self.info = info or distributed.init(config.train.device)
        self.out_dir = Path(config.train.out_dir)
        self.log = log if self.info.is_main else (lambda *a, **k: None)
        self.header = header or {}
        self.unigram_entropy = unigram_entropy  # the baseline drawn on the loss curve
        # Files copied into the run folder and the final model folder (the tokenizer).
        self.extra_files = extra_files or {}
        self.raw_model = model if model is not None else build_model(config, self.info, **(model_fields or {}))
        if config.data.seq_len > self.raw_model.config.max_position_embeddings:
            raise ValueError(f"data.seq_len: {config.data.seq_len} exceeds the model's context "
                             f"({self.raw_model.config.max_position_embeddings})")
        self.model = distributed.wrap(self.raw_model, config.train.distributed, self.info)
        self.optimizer = build_optimizer(self.raw_model, config, self.info.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.train.warmup_steps, config.train.max_steps, config.train.min_lr_ratio))
        if config.model.compile:
            self.model = torch.compile(self.model)
        self.autocast = _autocast(config, self.info.device)
        self.metrics = MetricsLog(self.out_dir, enabled=self.info.is_main)

    # ------------------------------------------------------------------------------------------------ state
    def _global_batch(self) -> int:
        d = self.config.data
        return d.micro_batch_size * d.grad_accum * self.info.world_size

    def _check_out_dir(self, resume: bool) -> Path | None:
        existing = ckpt.latest_checkpoint(self.out_dir)
        if resume:
            if existing is None:
                raise ValueError(f"--resume: no checkpoint in {ckpt.checkpoint_root(self.out_dir)}")
            return existing
        if existing is not None:
            raise ValueError(f"train.out_dir: {self.out_dir} already has checkpoints ({existing.name}); pass --resume "
                             f"to continue that run, or set train.out_dir to a new folder")
        return None

    def _check_resumable(self, path: Path) -> None:
        import json

        saved = json.loads((path / "model" / "config.json").read_text())
        mine = self.raw_model.config.to_hf_dict()
        differing = sorted(k for k in mine if saved.get(k) != mine[k])
        if differing:
            raise ValueError(f"--resume: the model in {path} differs from the config in {differing}")

    # ------------------------------------------------------------------------------------------------- loop
    def fit(self, resume: bool = False) -> TrainResult:
        cfg, info = self.config, self.info
        resume_from = self._check_out_dir(resume)
        step, samples, tokens, elapsed_before = 0, 0, 0, 0.0
        if resume_from is not None:
            self._check_resumable(resume_from)
            state = ckpt.load_checkpoint(resume_from, self.model, self.optimizer, self.scheduler, info)
            step, samples, tokens = state["step"], state["samples"], state["tokens"]
            elapsed_before = state.get("elapsed_s", 0.0)
            self.metrics.truncate_after(step)
            self.log(f"resumed from {resume_from} at step {step}")
        else:
            self.metrics.reset()
        if info.is_main:
            ckpt.remove_partial(self.out_dir)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(cfg.to_yaml())
            for name, src in self.extra_files.items():
                shutil.copyfile(src, self.out_dir / name)
        distributed.barrier(info)

        n_params = sum(p.numel() for p in self.raw_model.parameters())
        mc = self.raw_model.config
        tokens_per_step = self._global_batch() * cfg.data.seq_len
        flops_tok = flops_per_token(n_params, mc.num_hidden_layers, mc.hidden_size, cfg.data.seq_len)
        peak = peak_flops(info.device)
        self.log(f"model: {n_params / 1e6:.2f}M parameters ({cfg.model.preset}), backend {cfg.model.backend}, "
                 f"device {info.device}, {info.world_size} process(es)"
                 + (f", {cfg.train.distributed}" if info.enabled else ""))
        self.log(f"batch: {self._global_batch()} rows x {cfg.data.seq_len} tokens = {tokens_per_step} tokens/step, "
                 f"{cfg.train.max_steps} steps")
        for key, value in self.header.items():
            self.log(f"{key}: {value}")

        result = TrainResult(self.out_dir, step, last_checkpoint=resume_from)
        progress = self._progress(step)
        start = time.perf_counter()
        last_saved = step if resume_from is not None else -1
        try:
            self.model.train()
            while step < cfg.train.max_steps:
                t0 = time.perf_counter()
                loss, grad_norm, extra = self._step(samples, step + 1, result.last_checkpoint)
                step += 1
                samples += self._global_batch()
                tokens += tokens_per_step
                dt = time.perf_counter() - t0
                result.losses[step] = loss
                record = {"step": step, "loss": loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                          "tokens": tokens, "tok_per_s": tokens_per_step / dt,
                          "elapsed_s": elapsed_before + time.perf_counter() - start, **extra}
                if peak is not None:
                    record["mfu"] = flops_tok * tokens_per_step / dt / (peak * info.world_size)
                self.scheduler.step()
                self.metrics.write(record)
                self._update_progress(progress, record, step)

                final = step == cfg.train.max_steps
                if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or final:
                    val = self.evaluate()
                    if val is not None:
                        result.val_loss = val
                        self.metrics.write({"step": step, "val_loss": val})
                        self.log(f"step {step}: validation loss {val:.4f}")
                if (cfg.train.save_every and step % cfg.train.save_every == 0) or final:
                    state = {"samples": samples, "tokens": tokens,
                             "elapsed_s": elapsed_before + time.perf_counter() - start}
                    result.last_checkpoint = ckpt.save_checkpoint(
                        self.out_dir, step, self.model, self.optimizer, self.scheduler, state, cfg.to_yaml(), info,
                        keep=cfg.train.keep_checkpoints)
                    last_saved = step
                ckpt._kill_point("SPARROW_TEST_KILL_AFTER_STEP", step)
        finally:
            if progress is not None:
                progress.close()
            self.metrics.close()
        result.step, result.tokens = step, tokens
        result.wall_s = time.perf_counter() - start
        if last_saved == step and info.is_main:
            self._export(result.last_checkpoint)
        return result

    def _step(self, samples: int, step: int, last_checkpoint: Path | None) -> tuple[float, float, dict[str, float]]:
        cfg, info = self.config, self.info
        mb, accum = cfg.data.micro_batch_size, cfg.data.grad_accum
        batches = [self.data.train_batch(samples + (j * info.world_size + info.rank) * mb, mb) for j in range(accum)]
        weight_fn = getattr(self.objective, "weight", None)
        weights = [float(weight_fn(b)) if weight_fn else 1.0 for b in batches]
        total = distributed.all_reduce_sum(torch.tensor([sum(weights)], dtype=torch.float64), info).item()
        loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
        extra: dict[str, float] = {}
        for j, (batch, w) in enumerate(zip(batches, weights)):
            batch = to_device(batch, info.device)
            # Rank-averaging gradient reduction divides by world_size; the factor undoes it so the result is
            # the gradient of the global weighted mean.
            scale = w * info.world_size / total if total > 0 else 0.0
            with distributed.gradient_sync(self.model, enabled=j == accum - 1):
                with self.autocast():
                    loss, metrics = self.objective.loss(self.model, batch)
                (loss * scale).backward()
            loss_sum += loss.detach().double() * w
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0.0) + float(v) / accum
        loss_value = distributed.all_reduce_sum(loss_sum, info).item() / total if total > 0 else float("nan")
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
            raise NonFiniteLossError(
                f"step {step}: non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'} "
                f"(loss {loss_value}, gradient norm {grad_norm}); stopped before the optimizer step, {where}. "
                f"Lower train.lr or raise train.warmup_steps, then continue with --resume.")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, extra

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Validation loss (weighted like training) over up to ``train.eval_batches`` batches per rank."""
        cfg, info = self.config, self.info
        n_val = getattr(self.data, "num_val_samples", 0)
        if not n_val or cfg.train.eval_batches < 1:
            return None
        per_rank = min(cfg.data.micro_batch_size, n_val // info.world_size)
        if per_rank < 1:
            return None
        # The same number of batches on every rank: FSDP's forward is a collective.
        n_batches = min(cfg.train.eval_batches, n_val // (per_rank * info.world_size))
        weight_fn = getattr(self.objective, "weight", None)
        sums = torch.zeros(2, dtype=torch.float64, device=info.device)
        was_training = self.model.training
        self.model.eval()
        try:
            for b in range(n_batches):
                batch = self.data.val_batch((b * info.world_size + info.rank) * per_rank, per_rank)
                w = float(weight_fn(batch)) if weight_fn else 1.0
                with self.autocast():
                    loss, _ = self.objective.loss(self.model, to_device(batch, info.device))
                sums += torch.stack([loss.detach().double() * w, torch.tensor(w, dtype=torch.float64, device=info.device)])
        finally:
            self.model.train(was_training)
        distributed.all_reduce_sum(sums, info)
        return float(sums[0] / sums[1]) if sums[1] > 0 else None

    # ------------------------------------------------------------------------------------------ reporting
    def _progress(self, initial: int):
        if not (self.info.is_main and self.config.train.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.config.train.max_steps, initial=initial, desc="train", dynamic_ncols=True)

    def _update_progress(self, progress, record: dict[str, Any], step: int) -> None:
        every = self.config.train.log_every
        if progress is not None:
            progress.update(1)
            if step % every == 0 or step == 1:
                postfix = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                           "tok/s": f"{record['tok_per_s']:.0f}"}
                if "mfu" in record:
                    postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
                progress.set_postfix(postfix, refresh=False)
        elif step % every == 0:
            self.log(f"step {step}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, {record['tok_per_s']:.0f} tok/s")

    def _export(self, checkpoint_path: Path | None) -> None:
        """The final weights as ``<out_dir>/model`` (a from_pretrained folder, with the tokenizer beside them)
        and the loss curve as ``<out_dir>/loss.png``."""
        if checkpoint_path is not None:
            target = self.out_dir / "model"
            tmp = self.out_dir / f".model.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_path / "model", tmp)
            for name, src in self.extra_files.items():
                shutil.copyfile(src, tmp / name)
            old = self.out_dir / f".model.{os.getpid()}.old"
            if target.exists():
                os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        if self.config.train.plot:
            plot_loss(self.metrics.path, self.out_dir / "loss.png",
                      unigram_entropy=self.unigram_entropy, title=self.out_dir.name)
            plot_extra = getattr(self.objective, "plot", None)  # an objective's own curves (GRPO's rewards)
            if plot_extra is not None:
                plot_extra(self.metrics.path, self.out_dir)
