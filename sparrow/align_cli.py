"""Deprecated: ``sparrow.align_cli`` moved to sparrow.cli.training and sparrow.cli.inference. This alias keeps old
imports working and warns.
"""

import warnings

from .cli.inference import *  # noqa: F401,F403
from .cli.training import *  # noqa: F401,F403
from .cli.training import register as _register_training
from .cli.inference import register as _register_inference


def register(subparsers) -> None:
    _register_training(subparsers)
    _register_inference(subparsers)

warnings.warn(
    "sparrow.align_cli is deprecated: import from sparrow.cli.training and sparrow.cli.inference",
    DeprecationWarning, stacklevel=2)
