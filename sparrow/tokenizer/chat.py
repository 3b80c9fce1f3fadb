"""Chat on top of the tokenizer, in one place: the special tokens, the two chat templates (as Jinja for
transformers and as plain Python), rendering, the ids a generation stops on, a question's prompt ids, and the
label that marks a position as not learned (:data:`IGNORE_INDEX`).

Special tokens of tokenizers trained by Sparrow (ids in this order, ``<|endoftext|>`` is 0):

``<|endoftext|>``
    Ends every document in pretraining token files; also the padding token.
``<|system|>``, ``<|user|>``, ``<|assistant|>``
    Role headers of the ``sparrow`` chat template.
``<|end|>``
    Ends a chat turn; generation stops on it.

Two templates, both ending every turn with ``<|end|>``:

``sparrow`` (:data:`DEFAULT_CHAT_TEMPLATE`)::

    <|system|>\\n{system}<|end|>\\n<|user|>\\n{question}<|end|>\\n<|assistant|>\\n{answer}<|end|>\\n

``qa`` (the ``##提问:/##回答:`` style of the Chinese tiny-LLM projects)::

    {system}\\n\\n##提问:\\n{question}\\n##回答:\\n{answer}<|end|>\\n

Each exists as Jinja (saved in tokenizer_config.json, run by transformers' ``apply_chat_template``) and as plain
Python (:func:`render`); tests hold them equal.
"""

from __future__ import annotations

import re
from typing import Sequence

from ..model import IGNORE_INDEX  # noqa: F401  (defined by the loss; chat labels use it)

EOT = "<|endoftext|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = (EOT, SYSTEM, USER, ASSISTANT, END_OF_TURN)


# add_generation_prompt appends "<|assistant|>\n". Role tokens are whole special tokens, so the header of every
# turn is exactly two ids (role, "\n").
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

QA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '##提问:\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '##回答:\\n' + message['content'] + '<|end|>\\n' }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '##回答:\\n' }}{% endif %}"
)

TEMPLATES = {"sparrow": DEFAULT_CHAT_TEMPLATE, "qa": QA_CHAT_TEMPLATE}


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The ``sparrow`` template in plain Python (no Jinja), identical to :data:`DEFAULT_CHAT_TEMPLATE`."""
    parts = []
    for message in messages:
        role = message["role"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat role: {role}")
        parts.append(f"<|{role}|>\n{message['content']}{END_OF_TURN}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def _render_qa(messages: Sequence[dict], add_generation_prompt: bool) -> str:
    parts = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            parts.append(content + "\n\n")
        elif role == "user":
            parts.append(f"##提问:\n{content}\n")
        elif role == "assistant":
            parts.append(f"##回答:\n{content}{END_OF_TURN}\n")
        else:
            raise ValueError(f"unknown chat role: {role}")
    if add_generation_prompt:
        parts.append("##回答:\n")
    return "".join(parts)


def render(messages: Sequence[dict], template: str = "sparrow", add_generation_prompt: bool = False,
           **special_tokens: str) -> str:
    """The conversation as text. ``template``: a name of :data:`TEMPLATES` (rendered in plain Python, equal to
    :func:`render_jinja` of its Jinja) or a checkpoint's Jinja source (rendered by :func:`render_jinja` with
    ``special_tokens`` such as ``bos_token``)."""
    if template == "sparrow":
        return render_chat(messages, add_generation_prompt)
    if template == "qa":
        return _render_qa(messages, add_generation_prompt)
    if "{{" in template or "{%" in template:
        return render_jinja(template, messages, add_generation_prompt, **special_tokens)
    raise ValueError(f"template: unknown {template!r}; choose one of {sorted(TEMPLATES)} or give a Jinja template")


def template_for(tokenizer, template: str | None = None) -> str:
    """The chat template used with ``tokenizer``: ``template`` when given, else its model folder's
    (tokenizer_config.json's ``chat_template``, see :func:`sparrow.model_folder.load_tokenizer`): a Sparrow
    template by its name, another checkpoint's Jinja as is; ``"sparrow"`` when the folder has none."""
    if template is not None:
        return template
    source = getattr(tokenizer, "chat_template", None)
    if not source:
        return "sparrow"
    return next((name for name, jinja in TEMPLATES.items() if jinja == source), source)


def render_for(tokenizer, messages: Sequence[dict], template: str | None = None,
               add_generation_prompt: bool = False) -> str:
    """:func:`render` with ``tokenizer``'s template (:func:`template_for`) and its checkpoint's bos/eos texts."""
    return render(messages, template_for(tokenizer, template), add_generation_prompt,
                  **getattr(tokenizer, "chat_tokens", {}))


def render_jinja(source: str, messages: Sequence[dict], add_generation_prompt: bool = False,
                 **special_tokens: str) -> str:
    """Render a chat template the way transformers does (sandboxed Jinja, trim_blocks, lstrip_blocks), with the
    tokenizer's special tokens (``bos_token``, ``eos_token``) as variables."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                          **special_tokens)


def stop_ids(tokenizer) -> list[int]:
    """The ids generation stops on: end of turn, end of text (those the tokenizer has), then a checkpoint's eos
    ids (its template's end of turn, e.g. Llama-3's ``<|eot_id|>``; see :func:`sparrow.model_folder.load_tokenizer`)."""
    ids = [tokenizer.token_to_id(END_OF_TURN), tokenizer.token_to_id(EOT), *getattr(tokenizer, "eos_ids", ())]
    return [t for t in dict.fromkeys(ids) if t is not None]


def decode_answer(tokenizer, ids) -> str:
    """The text of generated ``ids`` without the stop tokens."""
    stops = set(stop_ids(tokenizer))
    return tokenizer.decode([t for t in ids if t not in stops])


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of text with every special-token text (role headers, ``<|end|>``) as the special token: for text
    the caller wrote in full (a raw completion prompt); a conversation goes through :func:`encode_messages`."""
    return list(tokenizer.encode(text, allowed_special="all"))


# Stand-ins for message contents while finding which special tokens the template itself writes (Unicode
# private-use characters, which no template emits).
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARK = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")


def encode_messages(tokenizer, messages: Sequence[dict], template: str | None = None,
                    add_generation_prompt: bool = False) -> list[int]:
    """Ids of a conversation rendered by :func:`render_for`, with special tokens only where the template writes
    them: special-token text inside a message's content (``<|user|>``, ``<|im_start|>``...) is encoded as
    ordinary text, so a user cannot forge a role header or end a turn. The ids equal :func:`encode_text` of the
    rendered text whenever no content holds special-token text.

    The template's own special tokens are found by rendering it with a stand-in for each content; a template
    that rewrites contents (a stand-in does not come through once and in order, or putting the contents back
    does not give the rendered text) is refused with ``ValueError`` when a content holds special-token text,
    never silently encoded with it."""
    text = render_for(tokenizer, messages, template, add_generation_prompt)
    specials = getattr(tokenizer, "special_tokens", {})
    contents = [str(m.get("content", "")) for m in messages]
    if not any(token in content for content in contents for token in specials):
        return encode_text(tokenizer, text)
    marked = render_for(tokenizer, [{**m, "content": f"{_MARK_OPEN}{i}{_MARK_CLOSE}"} for i, m in enumerate(messages)],
                        template, add_generation_prompt)
    parts = _MARK.split(marked)  # template text, content index, template text, ...
    rebuilt = "".join(contents[int(p)] if n % 2 else p for n, p in enumerate(parts))
    if [int(i) for i in parts[1::2]] != list(range(len(messages))) or rebuilt != text:
        raise ValueError("messages: a content holds special-token text and the chat template rewrites contents, "
                         "so it cannot be encoded as ordinary text")
    # Special tokens of the template split the text; everything between two of them (template text and contents
    # alike) is encoded as one ordinary piece, exactly as encode(..., allowed_special="all") splits it.
    split = re.compile("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")")
    ids, pending = [], ""
    for n, part in enumerate(parts):
        if n % 2:
            pending += contents[int(part)]
            continue
        for k, piece in enumerate(split.split(part)):
            if k % 2:
                ids += tokenizer.encode_ordinary(pending) if pending else []
                ids.append(specials[piece])
                pending = ""
            else:
                pending += piece
    return ids + (tokenizer.encode_ordinary(pending) if pending else [])


def prompt_ids(tokenizer, question: str, template: str | None = None) -> list[int]:
    """Ids of ``question`` asked as a user turn, ready for the assistant's answer; ``template`` defaults to the
    model's (:func:`template_for`)."""
    return encode_messages(tokenizer, [{"role": "user", "content": question}], template, add_generation_prompt=True)
