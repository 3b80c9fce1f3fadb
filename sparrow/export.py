"""Export to a Hugging Face folder that transformers loads without custom code:

    config.json, model.safetensors          (in the model's own architecture: LlamaForCausalLM for Sparrow's
                                             models, Qwen2/Qwen3/Mistral for checkpoints loaded from those;
                                             Sparrow already uses their parameter names)
    tokenizer.json, tokenizer_config.json   (PreTrainedTokenizerFast, with the chat template)
    generation_config.json                  (stops on the end-of-turn token as well as <|endoftext|>)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .model import SparrowForCausalLM
from .tokenizer import END_OF_TURN, EOT


def export_hf(model: SparrowForCausalLM | str | os.PathLike, tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike,
              *, chat_template: str | None = None) -> Path:
    """Write the folder and return its path. ``chat_template`` (Jinja) replaces the tokenizer's when given."""
    if not isinstance(model, SparrowForCausalLM):
        model = SparrowForCausalLM.from_pretrained(model)
    tokenizer_dir, out = Path(tokenizer_dir), Path(out_dir)
    files = {name: tokenizer_dir / name for name in ("tokenizer.json", "tokenizer_config.json")}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (expected a folder written by train_tokenizer)")
    vocab = json.loads(files["tokenizer.json"].read_text(encoding="utf-8"))
    token_ids = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
    size = max(list(vocab["model"]["vocab"].values()) + list(token_ids.values())) + 1
    if size > model.config.vocab_size:
        raise ValueError(f"tokenizer: {size} tokens but the model's vocab_size is {model.config.vocab_size}")
    out.mkdir(parents=True, exist_ok=True)
    # A checkpoint that came from Hugging Face keeps its own ids when its tokenizer lacks Sparrow's tokens.
    if END_OF_TURN in token_ids or EOT in token_ids:
        model.config.eos_token_id = token_ids.get(END_OF_TURN, token_ids.get(EOT))
        model.config.pad_token_id = token_ids.get(EOT)
    model.save_pretrained(out)
    shutil.copyfile(files["tokenizer.json"], out / "tokenizer.json")
    tok_config = json.loads(files["tokenizer_config.json"].read_text(encoding="utf-8"))
    if chat_template is not None:
        tok_config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    stops = [token_ids[t] for t in (END_OF_TURN, EOT) if t in token_ids] or model.config.eos_token_id
    generation = {"eos_token_id": stops, "pad_token_id": token_ids.get(EOT, model.config.pad_token_id), "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out
