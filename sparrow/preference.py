"""Deprecated: ``sparrow.preference`` moved to sparrow.post_training.preference_data. This alias keeps old imports
working and warns.
"""

import warnings

from .post_training.preference_data import *  # noqa: F401,F403
from .tokenizer.chat import stop_ids  # noqa: F401

warnings.warn(
    "sparrow.preference is deprecated: import from sparrow.post_training.preference_data",
    DeprecationWarning, stacklevel=2)
