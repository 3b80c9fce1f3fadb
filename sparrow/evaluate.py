"""Deprecated: ``sparrow.evaluate`` moved to sparrow.post_training.evaluation. This alias keeps old imports working and
warns.
"""

import warnings

from .post_training.evaluation import *  # noqa: F401,F403

warnings.warn(
    "sparrow.evaluate is deprecated: import from sparrow.post_training.evaluation",
    DeprecationWarning, stacklevel=2)
