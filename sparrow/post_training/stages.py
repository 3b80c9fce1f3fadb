"""The fine-tuning stages on the shared Trainer: SFT, DPO, the reward model and GRPO.

Each stage's YAML is the Trainer's (``model``, ``data``, ``train``; ``model.init_from`` names the starting
checkpoint) plus one section of its own::

    sft: {data: chats.jsonl, template: null, max_length: 512, pack: false, val_fraction: 0.05}
    dpo: {data: pairs.jsonl, template: null, max_length: 256, beta: 0.1, label_smoothing: 0.0,
          loss_type: sigmoid, rpo_alpha: 0.0, reference: null, val_fraction: 0.05}
    rm:  {data: pairs.jsonl, template: null, max_length: 256, val_fraction: 0.05}
    grpo: {data: builtin, tasks: [arithmetic], rewards: [exact], group_size: 8, max_new_tokens: 8,
           temperature: 1.0, top_k: 0, epsilon: 0.2, beta: 0.0, variant: grpo, updates_per_batch: 1,
           reference: null, template: null}

``grpo.data`` is ``builtin`` (the built-in corpus's fine-tuning questions of ``grpo.tasks``, never a held-out
one) or a jsonl of ``{prompt, reference}``; ``grpo.rewards`` names rewards of :mod:`.rewards` (or
``module:function``), summed, each optionally weighted (``[{name: arithmetic, weight: 1.0}, format]``);
``grpo.beta`` is the weight of the KL to the reference (0: no reference model is loaded);
``grpo.updates_per_batch`` is the optimizer steps on each generated batch (PPO epochs; ``train.save_every`` and
``train.max_steps`` must be multiples of it). See :mod:`.grpo`.

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
from ..train import Trainer, distributed
from ..train.config import Config, load_config, parse_override, read_config_file
from ..train.trainer import CausalLMObjective
from .chat_data import SFTDataset, encode_chat, read_records, to_messages
from .losses import DPOObjective, RewardObjective
from .grpo import GRPOObjective, PromptSource, builtin_prompts, read_prompts
from .preference_data import PreferenceDataset, read_pairs
from .reward_model import RewardModel
from .rewards import WeightedRewards

# The command that makes the model each stage starts from (for error messages).
STARTING_MODEL_COMMAND = {"sft": "sparrow pretrain", "dpo": "sparrow sft", "rm": "sparrow sft", "grpo": "sparrow dpo"}


@dataclass
class StageOptions:
    data: str | None = None
    tokenizer: str | None = None
    template: str | None = None        # None: the starting model's
    max_length: int = 512
    val_fraction: float = 0.05
    pack: bool = False                 # sft
    beta: float = 0.1                  # dpo: the temperature of the implicit reward; grpo: the KL weight
    label_smoothing: float = 0.0       # dpo
    loss_type: str = "sigmoid"         # dpo
    rpo_alpha: float = 0.0             # dpo: weight of the NLL of the chosen answers (TRL's rpo_alpha)
    reference: str | None = None       # dpo, grpo: default model.init_from
    cache_reference: bool = True       # dpo: reference log-probs computed once before training
    tasks: list[str] | None = None     # grpo, data: builtin: which tasks' questions (default all)
    rewards: Any = ("exact",)          # grpo: names (or module:function), optionally weighted
    group_size: int = 8                # grpo: completions per prompt
    max_new_tokens: int = 8            # grpo: answers are short
    temperature: float = 1.0           # grpo: sampling
    top_k: int = 0                     # grpo: sampling (0: off)
    epsilon: float = 0.2               # grpo: the ratio clip
    variant: str = "grpo"              # grpo: grpo (std-normalised, per-sequence mean) or dr_grpo
    updates_per_batch: int = 1         # grpo: optimizer steps on each generated batch (PPO epochs)
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
    # SFT may start from a new model of model.preset (no pretraining); its tokenizer must then be named.
    if config.model.init_from is None and not (stage == "sft" and options.tokenizer is not None):
        raise ValueError(f"model.init_from: the model folder to start from is required (e.g. runs/pretrain-tiny/model, "
                         f"made by `{STARTING_MODEL_COMMAND.get(stage, 'sparrow pretrain')}`)"
                         + ("; or start a new model.preset with sft.tokenizer naming its tokenizer.json"
                            if stage == "sft" else ""))
    return config, options


def starting_tokenizer(config: Config, options: StageOptions, stage: str) -> tuple[Any, Path]:
    """The tokenizer of ``model.init_from`` (or ``<stage>.tokenizer``) and its path; ``options.template`` becomes the
    template in use (:func:`~sparrow.tokenizer.chat.template_for`). A starting model that is not there is an error
    naming the folder and the command that makes it."""
    if config.model.init_from is None:  # a new model (sft only, see load_stage_config): the named tokenizer
        tok = load_tokenizer(Path(options.tokenizer), options.tokenizer)
        options.template = template_for(tok, options.template)
        return tok, find_tokenizer(Path(options.tokenizer), options.tokenizer)
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
    # A new model (no model.init_from) takes its vocabulary and end-of-text id from the tokenizer, as pretraining does.
    fields = None
    if config.model.init_from is None:
        fields = {"eos_token_id": tok.eot_id, "vocab_size": config.model.vocab_size or tok.vocab_size}
    return Trainer(config, data, CausalLMObjective(), log=log, model_fields=fields,
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


def grpo_prompts(config: Config, options: StageOptions) -> list[dict[str, str]]:
    """``grpo.data``: ``builtin`` (the questions of the corpus's world, ``data.builtin_seed``/``builtin_num_people``)
    or a jsonl of prompts with references."""
    if options.data == "builtin":
        return builtin_prompts(config.data.builtin_seed, config.data.builtin_num_people, options.tasks)
    if options.tasks is not None:
        raise ValueError("grpo.tasks: only for grpo.data: builtin")
    return read_prompts(options.data)


def build_grpo(config: Config, options: StageOptions, *, records: list[dict] | None = None, log=print) -> Trainer:
    k = options.updates_per_batch
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"grpo.updates_per_batch: must be an integer >= 1, got {k!r}")
    for name, value in (("train.save_every", config.train.save_every), ("train.max_steps", config.train.max_steps)):
        if value % k:
            raise ValueError(f"{name}: {value} is not a multiple of grpo.updates_per_batch ({k}); a checkpoint "
                             f"inside a rollout's updates could not be resumed exactly")
    tok, tok_path = starting_tokenizer(config, options, "grpo")
    records = records if records is not None else grpo_prompts(config, options)
    reward = WeightedRewards(options.rewards)
    reference = None
    if options.beta > 0:
        reference = SparrowForCausalLM.from_pretrained(options.reference or config.model.init_from,
                                                       backend=config.model.backend)
    objective = GRPOObjective(tok, reward, reference=reference, group_size=options.group_size,
                              max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                              top_k=options.top_k, epsilon=options.epsilon, beta=options.beta, variant=options.variant,
                              seed=config.train.seed, updates_per_batch=k)
    info = distributed.init(config.train.device)
    data = PromptSource(records, tok, template=options.template, seed=config.data.seed, updates_per_batch=k,
                        global_batch=config.data.micro_batch_size * config.data.grad_accum * info.world_size)
    return Trainer(config, data, objective, info=info, log=log,
                   header={"grpo": f"{len(records)} prompts x {options.group_size} samples, reward {reward.describe()}, "
                                   f"{options.variant}, beta {options.beta}, epsilon {options.epsilon}, "
                                   f"temperature {options.temperature}, {options.max_new_tokens} new tokens"
                                   + (f", {k} updates per generated batch" if k > 1 else "")},
                   extra_files=_tokenizer_files(Path(config.train.out_dir), tok_path, options.template))


BUILDERS = {"sft": build_sft, "dpo": build_dpo, "rm": build_rm, "grpo": build_grpo}
