"""User-facing errors.

A :class:`QuantkitError` is a mistake the user can fix (bad input, missing access, not enough disk):
the CLI prints its message on one line and exits non-zero, without a traceback. Anything else is a bug
and keeps its traceback.
"""


class QuantkitError(Exception):
    """One-line, actionable error. ``str(err)`` says what was wrong and what to do."""

    exit_code = 2


class GateFailed(QuantkitError):
    """A quality gate (``--max-kld`` and friends) failed: the work ran, the result is not acceptable."""

    exit_code = 1
