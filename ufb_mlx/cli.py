"""What every command-line tool shares: user errors end as one line on stderr and a
non-zero exit, never a traceback. Faults of the environment count as user errors: the file
system (a read-only or full disk, a file where a folder should be, MLX failing to open or
read a file) and memory; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import re
import sys
from typing import Callable

from ufb_ref.errors import UFBError
from ufb_ref.fsio import describe_os_error

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# MLX reports I/O and allocation failures as RuntimeError, tagged by the operation:
# "[load_safetensors] Failed to open file ...", "[malloc] Unable to allocate ...".
_MLX_ENVIRONMENT_ERROR = re.compile(r"^\[(load|save)\w*\]|^\[\w*malloc\w*\]|Unable to allocate")


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    try:
        return main(argv) or 0
    except UFBError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        return _fail(describe_os_error(e))
    except MemoryError:
        return _fail("out of memory")
    except RuntimeError as e:
        if not _MLX_ENVIRONMENT_ERROR.search(str(e)):
            raise
        return _fail(str(e))


def _fail(message: str) -> int:
    lines = message.strip().splitlines() or ["failed"]
    print(f"error: {lines[0]}", file=sys.stderr)
    return EXIT_USER_ERROR
