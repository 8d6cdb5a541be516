"""Mapping of the known error kinds to the one-sentence messages users see."""
from __future__ import annotations


EXIT_OK, EXIT_NONE, EXIT_SOME_FAILED = 0, 1, 2  # all scored; nothing scored or a usage error; some failed


class UsageError(Exception):
    """A problem with what the user asked for (paths, options)."""


def user_message(e: BaseException) -> str | None:
    """The one-line message for an expected error, or None for an unexpected one."""
    from .transforms import RasterError
    from .weights import WeightsError

    known: tuple[type[BaseException], ...] = (UsageError, WeightsError, RasterError, FileNotFoundError, PermissionError)
    try:
        from .fetch import FetchError

        known = known + (FetchError,)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(e, known):
        return str(e)
    return None
