"""Deprecated: ``sparrow.sft`` moved to sparrow.post_training.chat_data and sparrow.tokenizer.chat. This alias keeps
old imports working and warns.
"""

import warnings

from .post_training.chat_data import *  # noqa: F401,F403
from .tokenizer.chat import IGNORE_INDEX, QA_CHAT_TEMPLATE, TEMPLATES, render, render_jinja  # noqa: F401

warnings.warn(
    "sparrow.sft is deprecated: import from sparrow.post_training.chat_data and sparrow.tokenizer.chat",
    DeprecationWarning, stacklevel=2)
