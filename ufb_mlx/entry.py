"""How every command-line tool ends: a user error as one line on stderr and exit status
2, Ctrl-C as status 130 with a line that says how to continue, never a traceback. Each
tool's ``main(argv)`` raises; ``errors_to_exit`` turns that into the exit status, and
``console(main)`` is the zero-argument function a console script (``ufb-generate``, ...)
calls."""

from __future__ import annotations

import sys
from typing import Callable

from ufb_ref.errors import UFBError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during work that can be continued; the message says how."""


def errors_to_exit(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; return its exit status."""
    try:
        return main(argv) or 0
    except UFBError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def console(main: Callable[[list[str] | None], int | None]) -> Callable[[], None]:
    """The console-script entry of a tool: runs ``main`` on sys.argv and exits."""
    def entry() -> None:
        sys.exit(errors_to_exit(main))

    return entry
