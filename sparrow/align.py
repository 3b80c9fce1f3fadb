"""Deprecated: ``sparrow.align`` moved to sparrow.post_training.losses and sparrow.post_training.reward_model. This
alias keeps old imports working and warns.
"""

import warnings

from .post_training.losses import *  # noqa: F401,F403
from .post_training.reward_model import RewardModel  # noqa: F401

warnings.warn(
    "sparrow.align is deprecated: import from sparrow.post_training.losses and sparrow.post_training.reward_model",
    DeprecationWarning, stacklevel=2)
