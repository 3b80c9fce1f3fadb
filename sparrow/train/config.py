"""Training configuration: three sections (``model``, ``data``, ``train``) of dataclasses, loaded from YAML and
overridden from the command line with dotted keys (``train.lr=3e-4``).

Every key is checked: an unknown section or key is a ``ValueError`` that lists the valid ones, and values are
converted to the field's type (so ``3e-4``, which YAML 1.1 reads as a string, is a float here), before any
training starts. The resolved config is written beside each checkpoint, so a run can be reproduced from it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..model import PRESETS, SparrowConfig


@dataclass
class ModelSection:
    preset: str = "tiny"
    # Ops backend for every norm/rotary/attention call (sparrow.patch): auto, reference, triton or cuda.
    backend: str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    # A save_pretrained folder to start from instead of random weights (fine-tuning stages).
    init_from: str | None = None
    # Any SparrowConfig field; None keeps the preset's value.
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float | None = None
    rms_norm_eps: float | None = None
    tie_word_embeddings: bool | None = None
    initializer_range: float | None = None
    # Mixture of experts (see SparrowConfig; preset moe-tiny): 0 experts means dense MLPs.
    num_local_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool | None = None
    decoder_sparse_step: int | None = None
    router_aux_loss_coef: float | None = None
    router_z_loss_coef: float | None = None

    def model_config(self, **extra: Any) -> SparrowConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset: unknown {self.preset!r}; choose one of {sorted(PRESETS)}")
        overrides = {name: getattr(self, name) for name in _MODEL_OVERRIDES if getattr(self, name) is not None}
        return SparrowConfig.from_preset(self.preset, **{**overrides, **extra})


# Model fields settable from the config (the rest of SparrowConfig, token ids, comes from the data).
_MODEL_OVERRIDES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps",
                    "tie_word_embeddings", "initializer_range", "num_local_experts", "num_experts_per_tok",
                    "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "router_aux_loss_coef",
                    "router_z_loss_coef")


@dataclass
class DataSection:
    # "builtin" (Python's docs + the generated bilingual corpus, tokenized on first use) or a token file
    # written by `sparrow data tokenize` (its prefix, .bin or .json).
    source: str = "builtin"
    seq_len: int = 256
    micro_batch_size: int = 8  # rows per forward pass on each rank
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = micro * accum * world size
    val_fraction: float = 0.01  # windows held out for validation loss (0: none)
    seed: int = 0  # order of the windows
    # Where the built-in corpus's tokenizer and token file are cached (reused by every run with the same settings).
    cache_dir: str = "runs/cache"
    builtin_seed: int = 0
    builtin_python_docs: bool = True
    builtin_arithmetic_docs: int = 1000
    builtin_num_people: int = 240
    builtin_reading_docs: int = 1000
    # One token per digit in the built-in corpus's tokenizer (sparrow.tokenizer.training.build_trainer_tokenizer):
    # numbers become digit sequences (sums learnable digit by digit). Off: the demo's measured tokenizer.
    builtin_split_digits: bool = False


@dataclass
class TrainSection:
    out_dir: str = "runs/pretrain-tiny"
    max_steps: int = 240
    seed: int = 0  # model initialisation
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 24
    weight_decay: float = 0.1
    # The MoE routers' (gate weights') learning rate as a fraction of lr. AdamW moves every router weight by about
    # lr per step whatever the gradient's size, and a small model's router input is mostly one shared direction,
    # so at the full lr each step shifts an expert's logit for every token at once by more than the logits differ
    # between tokens: the load-balancing loss overshoots and some expert gets almost no tokens at each step
    # (moe-tiny at 3e-3: worst layer's max/min ~1000). No effect on dense models.
    router_lr_scale: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: off
    # AdamW's fused implementation where torch has one for the device; None: use it when available.
    fused_adamw: bool | None = None
    device: str = "auto"  # auto: cuda:LOCAL_RANK when a GPU is present, else cpu
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32
    distributed: str = "ddp"  # with torchrun (WORLD_SIZE > 1): ddp or fsdp (FSDP2 fully_shard)
    log_every: int = 10
    eval_every: int = 80  # 0: only at the end
    eval_batches: int = 4
    save_every: int = 80  # 0: only at the end
    keep_checkpoints: int = 2
    progress: bool = True
    plot: bool = True


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def validate(self) -> None:
        """Checks that need more than one key; each message names the key to change."""
        t, d = self.train, self.data
        choices = {"train.precision": (t.precision, ("auto", "bf16", "fp32")),
                   "train.distributed": (t.distributed, ("ddp", "fsdp")),
                   "model.backend": (self.model.backend, ("auto", "reference", "triton", "cuda"))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{key}: must be one of {list(allowed)}, got {value!r}")
        positive = {"data.seq_len": d.seq_len, "data.micro_batch_size": d.micro_batch_size,
                    "data.grad_accum": d.grad_accum, "train.max_steps": t.max_steps, "train.log_every": t.log_every}
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key}: must be at least 1, got {value}")
        if not 0 <= d.val_fraction < 1:
            raise ValueError(f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
        if t.router_lr_scale < 0:
            raise ValueError(f"train.router_lr_scale: must be >= 0, got {t.router_lr_scale}")
        if t.lr <= 0 or not 0 <= t.min_lr_ratio <= 1 or t.warmup_steps < 0:
            raise ValueError("train.lr must be positive, train.min_lr_ratio in [0, 1] and train.warmup_steps >= 0")
        model = self.model.model_config()
        if d.seq_len > model.max_position_embeddings:
            raise ValueError(f"data.seq_len: {d.seq_len} exceeds the model's context "
                             f"(model.max_position_embeddings = {model.max_position_embeddings})")


SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection}


def valid_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_INVALID = object()
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _convert(value: Any, annotation: Any) -> Any:
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        return True if text in _TRUE else False if text in _FALSE else _INVALID
    if annotation is int:
        if isinstance(value, bool):
            return _INVALID
        try:
            number = float(value)
        except (TypeError, ValueError):
            return _INVALID
        return int(number) if number.is_integer() else _INVALID
    if annotation is float:
        if isinstance(value, bool):
            return _INVALID
        try:
            return float(value)
        except (TypeError, ValueError):
            return _INVALID
    if annotation is str:
        return _INVALID if isinstance(value, (dict, list)) else str(value)
    raise TypeError(f"unsupported config field type {annotation}")  # a programming error, not bad input


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` (from YAML or a command-line string) as the field's type; a ValueError names ``key``."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")):
            return None
        annotation = next(a for a in args if a is not type(None))
    result = _convert(value, annotation)
    if result is _INVALID:
        name = getattr(annotation, "__name__", str(annotation))
        raise ValueError(f"{key}: expected {name}{' or null' if optional else ''}, got {value!r}")
    return result


def from_dict(values: dict[str, Any], source: str = "config") -> Config:
    config = Config()
    apply_dict(config, values, source)
    return config


def apply_dict(config: Config, values: dict[str, Any], source: str = "config") -> None:
    if not isinstance(values, dict):
        raise ValueError(f"{source}: expected a mapping of sections {sorted(SECTIONS)}, got {type(values).__name__}")
    for section_name, section_values in values.items():
        if section_name not in SECTIONS:
            raise ValueError(f"{source}: unknown section {section_name!r}; valid keys are {valid_keys()}")
        if section_values is None:
            continue
        if not isinstance(section_values, dict):
            raise ValueError(f"{source}: section {section_name!r} must be a mapping of keys")
        for key, value in section_values.items():
            set_key(config, f"{section_name}.{key}", value, source)


def set_key(config: Config, dotted: str, value: Any, source: str = "override") -> None:
    section_name, _, key = dotted.partition(".")
    cls = SECTIONS.get(section_name)
    if cls is None or key not in {f.name for f in dataclasses.fields(cls)}:
        raise ValueError(f"{source}: unknown key {dotted!r}; valid keys are {valid_keys()}")
    setattr(getattr(config, section_name), key, coerce(dotted, value, _field_types(cls)[key]))


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value``; the value is read as YAML (numbers, true/false, null), then typed by the field."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r}: expected section.key=value, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The sections of a YAML config file, as a dict; a missing file or invalid YAML is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of sections (model, data, train, ...), got {type(values).__name__}")
    return values


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *,
                values: dict[str, Any] | None = None) -> Config:
    """The defaults, then the YAML file at ``path`` (if any; or its already-read sections, ``values``), then
    each ``section.key=value`` override."""
    config = Config()
    if values is None and path is not None:
        values = read_config_file(path)
    if values is not None:
        apply_dict(config, values, str(path or "config"))
    for text in overrides:
        key, value = parse_override(text)
        set_key(config, key, value)
    config.validate()
    return config
