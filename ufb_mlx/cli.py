"""What every command-line tool shares: user errors end as one line on stderr and a
non-zero exit, never a traceback."""

from __future__ import annotations

import sys
from typing import Callable

from ufb_ref.errors import UFBError

EXIT_USER_ERROR = 2


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    try:
        return main(argv) or 0
    except UFBError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
