"""Deprecated: ``sparrow.stages`` moved to sparrow.post_training.stages. This alias keeps old imports working and
warns.
"""

import warnings

from .post_training.stages import *  # noqa: F401,F403

warnings.warn(
    "sparrow.stages is deprecated: import from sparrow.post_training.stages",
    DeprecationWarning, stacklevel=2)
