"""One error hierarchy for the whole package.

Messages say what went wrong, where (``file:tensor_key``) and, where it helps, how to
fix it. The CLI turns any ``NpstuneError`` into one line on stderr and a non-zero exit.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none):
    what a one-line error quotes of another."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class NpstuneError(Exception):
    """Base class of every error npstune raises on purpose."""


class ConfigError(NpstuneError, ValueError):
    """Bad user input: an unknown method, a parameter out of range,
    a bad config file."""


class CheckpointError(NpstuneError):
    """A checkpoint cannot be read or written, or its keys/dtypes don't fit the plan."""


class ShapeMismatchError(CheckpointError):
    """Two checkpoints disagree on a tensor's shape."""


class MissingDependencyError(NpstuneError, ImportError):
    """An optional dependency is not installed;
    the message names the extra to install."""


class SearchError(NpstuneError):
    """A search cannot start or continue (bad resources, broken state,
    failed trials)."""


def missing(extra: str, package: str) -> MissingDependencyError:
    """Build the standard error for an absent optional dependency."""
    return MissingDependencyError(
        f"{package} is not installed; install it with: pip install 'npstune[{extra}]'"
    )
