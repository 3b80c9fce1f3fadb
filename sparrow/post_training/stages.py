"""The fine-tuning stages on the shared Trainer: SFT, DPO and the reward model.

Each stage's YAML is the Trainer's (``model``, ``data``, ``train``; ``model.init_from`` names the starting
checkpoint) plus one section of its own::

    sft: {data: chats.jsonl, template: null, max_length: 512, pack: false, val_fraction: 0.05}
    dpo: {data: pairs.jsonl, template: null, max_length: 256, beta: 0.1, label_smoothing: 0.0,
          loss_type: sigmoid, rpo_alpha: 0.0, reference: null, val_fraction: 0.05}
    rm:  {data: pairs.jsonl, template: null, max_length: 256, val_fraction: 0.05}

The tokenizer is the starting model's (:func:`sparrow.model_folder.load_tokenizer`: the C++ encoder, or HF
tokenizers for a layout it does not implement) unless ``<stage>.tokenizer`` names another. ``template: null`` (the
default) is the starting model's chat template (a Hugging Face checkpoint's Jinja and eos token included; "sparrow"
for a folder without one), or a name of ``TEMPLATES``. The finished model folder gets the tokenizer too, with the
stage's chat template in tokenizer_config.json.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from ..model import SparrowForCausalLM
from ..model_folder import find_tokenizer, load_tokenizer
from ..tokenizer.chat import TEMPLATES, template_for
from ..train import Trainer
from ..train.config import Config, load_config, parse_override, read_config_file
from ..train.trainer import CausalLMObjective
from .chat_data import SFTDataset, encode_chat, read_records, to_messages
from .losses import DPOObjective, RewardObjective
from .preference_data import PreferenceDataset, read_pairs
from .reward_model import RewardModel

# The command that makes the model each stage starts from (for error messages).
STARTING_MODEL_COMMAND = {"sft": "sparrow pretrain", "dpo": "sparrow sft", "rm": "sparrow sft"}


@dataclass
class StageOptions:
    data: str | None = None
    tokenizer: str | None = None
    template: str | None = None        # None: the starting model's
    max_length: int = 512
    val_fraction: float = 0.05
    pack: bool = False                 # sft
    beta: float = 0.1                  # dpo
    label_smoothing: float = 0.0       # dpo
    loss_type: str = "sigmoid"         # dpo
    rpo_alpha: float = 0.0             # dpo: weight of the NLL of the chosen answers (TRL's rpo_alpha)
    reference: str | None = None       # dpo: default model.init_from
    cache_reference: bool = True       # dpo: reference log-probs computed once before training
    extra: dict[str, Any] = field(default_factory=dict)


def load_stage_config(stage: str, path: str | Path | None, overrides: Sequence[str] = ()) -> tuple[Config, StageOptions]:
    """The Trainer's config and this stage's options from one YAML; overrides are ``section.key=value`` for
    either (``dpo.beta=0.2``, ``train.lr=1e-4``)."""
    values = read_config_file(path) if path is not None else {}
    own = dict(values.pop(stage, None) or {})
    names = {f.name for f in fields(StageOptions)} - {"extra"}
    shared = []
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith(stage + "."):
            own[key.split(".", 1)[1]] = value
        else:
            shared.append(text)
    unknown = sorted(set(own) - names)
    if unknown:
        raise ValueError(f"{stage}: unknown keys {unknown}; valid keys are {sorted(names)}")
    options = StageOptions(**own)
    if options.data is None:
        raise ValueError(f"{stage}.data: a jsonl file is required")
    config = load_config(path, shared, values=values)
    if config.model.init_from is None:
        raise ValueError(f"model.init_from: the model folder to start from is required (e.g. runs/pretrain-tiny/model, "
                         f"made by `{STARTING_MODEL_COMMAND.get(stage, 'sparrow pretrain')}`)")
    return config, options


def starting_tokenizer(config: Config, options: StageOptions, stage: str) -> tuple[Any, Path]:
    """The tokenizer of ``model.init_from`` (or ``<stage>.tokenizer``) and its path; ``options.template`` becomes the
    template in use (:func:`~sparrow.tokenizer.chat.template_for`). A starting model that is not there is an error
    naming the folder and the command that makes it."""
    start = Path(config.model.init_from)
    made_by = STARTING_MODEL_COMMAND.get(stage, "sparrow pretrain")
    if options.tokenizer is None and not (start / "config.json").is_file():
        raise FileNotFoundError(f"{start}: no model to start from (model.init_from); make one with `{made_by}`")
    try:
        path = find_tokenizer(start, options.tokenizer)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}; or name one with {stage}.tokenizer") from exc
    tok = load_tokenizer(start, path)
    options.template = template_for(tok, options.template)
    return tok, path


def _tokenizer_files(out_dir: Path, tokenizer_path: Path, template: str) -> dict[str, Path]:
    """tokenizer.json and a tokenizer_config.json carrying the stage's chat template, to ship with the model."""
    folder = out_dir / ".tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    config_path = tokenizer_path.parent / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    tok_config["chat_template"] = TEMPLATES.get(template, template)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"tokenizer.json": tokenizer_path, "tokenizer_config.json": folder / "tokenizer_config.json"}


def _template_name(template: str) -> str:
    return template if template in TEMPLATES else "the checkpoint's (Jinja)"


def _split(records: list, fraction: float, seed: int) -> tuple[list, list]:
    records = list(records)
    random.Random(seed).shuffle(records)
    n_val = int(len(records) * fraction)
    if fraction > 0 and len(records) > 1:
        n_val = max(1, n_val)
    return records[n_val:], records[:n_val]


def build_sft(config: Config, options: StageOptions, *, records: list[dict] | None = None, log=print) -> Trainer:
    tok, tok_path = starting_tokenizer(config, options, "sft")
    records = records if records is not None else read_records(options.data)
    train, val = _split(records, options.val_fraction, config.data.seed)
    max_length = min(options.max_length, config.data.seq_len)
    encode = lambda rows: [encode_chat(tok, to_messages(r), options.template, max_length) for r in rows]
    data = SFTDataset(encode(train), val_examples=encode(val), pad_id=tok.eot_id or 0, pack=options.pack)
    return Trainer(config, data, CausalLMObjective(), log=log,
                   header={"sft": f"{len(train)} conversations ({len(val)} held out), template {_template_name(options.template)}"},
                   extra_files=_tokenizer_files(Path(config.train.out_dir), tok_path, options.template))


def _preference_stage(stage: str, config: Config, options: StageOptions, pairs: list[dict] | None):
    """What DPO and the reward model share: the tokenizer and the split, encoded pairs."""
    tok, tok_path = starting_tokenizer(config, options, stage)
    pairs = pairs if pairs is not None else read_pairs(options.data)
    train, val = _split(pairs, options.val_fraction, config.data.seed)
    data = PreferenceDataset(train, tok, template=options.template, max_length=min(options.max_length, config.data.seq_len),
                             val_pairs=val)
    return data, f"{len(train)} pairs ({len(val)} held out)", _tokenizer_files(Path(config.train.out_dir), tok_path,
                                                                               options.template)


def build_dpo(config: Config, options: StageOptions, *, pairs: list[dict] | None = None, log=print) -> Trainer:
    data, counts, files = _preference_stage("dpo", config, options, pairs)
    reference = SparrowForCausalLM.from_pretrained(options.reference or config.model.init_from)
    if options.cache_reference:
        data.cache_reference(reference)
        reference = None
    objective = DPOObjective(reference, beta=options.beta, label_smoothing=options.label_smoothing,
                             loss_type=options.loss_type, rpo_alpha=options.rpo_alpha)
    return Trainer(config, data, objective, log=log,
                   header={"dpo": f"{counts}, beta {options.beta}, {options.loss_type}, label smoothing "
                                  f"{options.label_smoothing}, rpo_alpha {options.rpo_alpha}"},
                   extra_files=files)


def build_rm(config: Config, options: StageOptions, *, pairs: list[dict] | None = None, log=print) -> Trainer:
    data, counts, files = _preference_stage("rm", config, options, pairs)
    model = RewardModel.from_causal_lm(SparrowForCausalLM.from_pretrained(config.model.init_from, backend=config.model.backend))
    return Trainer(config, data, RewardObjective(), model=model, log=log, header={"rm": counts}, extra_files=files)


BUILDERS = {"sft": build_sft, "dpo": build_dpo, "rm": build_rm}
