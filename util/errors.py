"""Error types of the project's own, so entry scripts can turn them into one-line messages.

``ConfigError`` (util.registry) is a bad configuration; ``DataError`` is a bad input file or data layout
(unreadable or truncated member file, mispaired listing, bad split file). Both are ``ValueError`` subclasses.
"""
from util.registry import ConfigError


class DataError(ValueError):
    """A problem with input data: the message names the file (or key) and what was expected."""


__all__ = ["ConfigError", "DataError"]
