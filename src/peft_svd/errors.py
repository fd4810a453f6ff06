"""The warning category of peft-svd.

Every warning the library and its workflow raise is a :class:`PeftSVDWarning`, so a user (or a test
suite) can silence, log or escalate exactly them, wherever ``stacklevel`` attributes them:
``warnings.simplefilter("error", PeftSVDWarning)``.
"""

from __future__ import annotations

__all__ = ["PeftSVDWarning"]


class PeftSVDWarning(UserWarning):
    """A warning raised by peft-svd (a subclass of ``UserWarning``)."""
