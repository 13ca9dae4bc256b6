"""The user-error contract: every fault a user can fix ends in one line that names the file, key or flag and the
fix, and exit code 2. The traceback stays behind ``--debug`` / ``OSTINATO_DEBUG=1``.

``UserError`` is the one type for such faults; the builtin file errors (missing, existing, unreadable, read-only,
disk full) are translated here too, so a library function may simply let them rise.
"""
from __future__ import annotations

import difflib
import errno
import logging
import os
import sys
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DEBUG_ENV = "OSTINATO_DEBUG"


class UserError(Exception):
    """A problem the user can fix; the message is one line naming the file, key or flag and the fix."""


class DataMismatch(UserError, ValueError):
    """A family's dimensions (codebooks, card, channels, streams) that do not fit its data's manifests, found when
    training sets up, before any step; one line naming both numbers, the key and the fix."""


def did_you_mean(word: str, options: Iterable[str], n: int = 3) -> str:
    """`` (did you mean a, b?)`` for the closest of ``options``, or ``""``: at most ``n``, and only those about as
    close as the best (``trainer.max_stepz`` suggests ``max_steps``, not also ``max_time``)."""
    close = difflib.get_close_matches(word, list(options), n=n, cutoff=0.6)
    if close:
        score = lambda option: difflib.SequenceMatcher(None, word, option).ratio()  # noqa: E731
        best = score(close[0])
        close = [c for c in close if score(c) >= best - 0.05]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def debug_enabled(argv: list[str] | None = None) -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or bool(argv and "--debug" in argv)


# OSError numbers that are the user's to fix, with the fix.
_OS_FIXES = {
    errno.ENOSPC: "no space left on device; free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
    errno.EROFS: "read-only file system; choose a writable output folder",
    errno.EACCES: "permission denied; choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted; check the file's owner and permissions",
    errno.ENOENT: "no such file or folder; check the path",
    errno.EEXIST: "already exists; remove it or choose another name",
    errno.ENOTDIR: "not a folder; give a folder here",
    errno.EISDIR: "is a folder; give a file here",
}


def user_message(e: BaseException, value_errors: bool = True) -> str | None:
    """The one-line message of an error the user can fix, or None for a bug (which keeps its traceback).
    ``value_errors``: count a plain ValueError as the user's (the CLI verbs' argument checks raise it)."""
    if isinstance(e, UserError):
        return _one_line(str(e))
    if isinstance(e, OSError) and e.errno in _OS_FIXES:
        if e.filename is None:  # raised with a message of our own, or by a library that named no file
            return _one_line(str(e.args[-1] if e.args else e)) if not e.strerror else _OS_FIXES[e.errno]
        return f"{e.filename}: {_OS_FIXES[e.errno]}"
    if isinstance(e, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return _one_line(str(e))
    if value_errors and isinstance(e, ValueError):  # the library's argument and file checks raise it, with the fix
        return _one_line(str(e))
    return None


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return "; ".join(lines) if lines else "(no message)"


@contextmanager
def user_errors(prog: str, debug: bool = False, value_errors: bool = True) -> Iterator[None]:
    """Run a command: a user error prints ``prog: error: MESSAGE`` on stderr and exits 2 (the traceback too when
    ``debug`` or ``$OSTINATO_DEBUG``); Ctrl-C exits 130 with one line; anything else keeps its traceback.
    Training passes ``value_errors=False``: a ValueError from deep in a step is a bug, not a bad argument."""
    debug = debug or debug_enabled()
    try:
        yield
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - sorted into user errors (one line) and bugs (re-raised)
        message = user_message(e, value_errors)
        if message is None:
            raise
        logging.getLogger("ostinato").debug("%s", message, exc_info=True)  # the traceback in a log file
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
