"""Byte-level BPE for Sparrow: a C++ encoder byte-exact with HF tokenizers and tiktoken, and training.

    from sparrow.tokenizer import Tokenizer, train_tokenizer
    tok = Tokenizer.from_file("out/tokenizer/tokenizer.json")       # or a .tiktoken rank file
    ids = tok.encode("Hello 世界")
    text = tok.decode(ids)

Special tokens of tokenizers trained by Sparrow (ids in this order, ``<|endoftext|>`` is 0):

``<|endoftext|>``
    Ends every document in pretraining token files; also the padding token.
``<|system|>``, ``<|user|>``, ``<|assistant|>``
    Role headers of the chat template (:data:`DEFAULT_CHAT_TEMPLATE`).
``<|end|>``
    Ends a chat turn; generation stops on it.
"""

from __future__ import annotations

from .encoder import PATTERNS, Tokenizer

EOT = "<|endoftext|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = (EOT, SYSTEM, USER, ASSISTANT, END_OF_TURN)

# Jinja chat template saved in tokenizer_config.json (transformers' apply_chat_template runs it):
#   <|system|>\n{content}<|end|>\n<|user|>\n{content}<|end|>\n<|assistant|>\n{content}<|end|>\n
# add_generation_prompt appends "<|assistant|>\n". Role tokens are whole special tokens, so the header of
# every turn is exactly two ids (role, "\n").
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def render_chat(messages, add_generation_prompt: bool = False) -> str:
    """The chat template in plain Python (no Jinja), identical to :data:`DEFAULT_CHAT_TEMPLATE`."""
    parts = []
    for message in messages:
        role = message["role"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat role: {role}")
        parts.append(f"<|{role}|>\n{message['content']}<|end|>\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


from .training import merge_tokenizers, train_tokenizer  # noqa: E402  (needs the constants above)

__all__ = [
    "ASSISTANT", "DEFAULT_CHAT_TEMPLATE", "END_OF_TURN", "EOT", "PATTERNS", "SPECIAL_TOKENS", "SYSTEM", "USER",
    "Tokenizer", "merge_tokenizers", "render_chat", "train_tokenizer",
]
