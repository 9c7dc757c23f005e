"""How every command-line tool ends: a user error as one line on stderr and exit status
2, Ctrl-C as status 130 with a line that says how to continue, never a traceback. Each
tool's ``main(argv)`` raises; ``errors_to_exit`` turns that into the exit status, and
``console(main)`` is the zero-argument function a console script (``ufb-generate``, ...)
calls. Faults of the environment count as user errors: the file system (a read-only or
full disk, a file where a folder should be, MLX failing to open or read a file) and
memory; any other exception is a bug and keeps its traceback."""

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
# A full disk: "[write] Unable to write 1048576 bytes" (an std::ofstream that failed).
_MLX_ENVIRONMENT_ERROR = re.compile(r"^\[(load|save|write|read)\w*\]|^\[\w*malloc\w*\]|Unable to allocate|"
                                    r"Unable to write")


def errors_to_exit(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; return its exit status."""
    try:
        return main(argv) or 0
    except UFBError as e:
        return _fail(str(e))
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        return _fail(describe_os_error(e))
    except MemoryError:
        return _fail("out of memory")
    except UnicodeEncodeError as e:
        if e.encoding.replace("-", "").lower() == (sys.stdout.encoding or "").replace("-", "").lower():
            return _fail(f"cannot print {e.object[e.start:e.end]!r}: standard output's encoding is {e.encoding}; "
                         "set PYTHONIOENCODING=utf-8")
        raise
    except RuntimeError as e:
        if not _MLX_ENVIRONMENT_ERROR.search(str(e)):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        return _fail(first + (" (is the disk full?)" if "Unable to write" in first else ""))


def _fail(message: str) -> int:
    lines = message.strip().splitlines() or ["failed"]
    print(f"error: {lines[0]}", file=sys.stderr)
    return EXIT_USER_ERROR


def console(main: Callable[[list[str] | None], int | None]) -> Callable[[], None]:
    """The console-script entry of a tool: says so when MLX's CPU matmuls run on the slow
    reference BLAS (ufb_mlx.blas.startup_note), sets up MLX's CPU runtime for a process
    that runs a model (ufb_mlx.backend.configure_cpu_runtime), runs ``main`` on sys.argv,
    exits."""
    def entry() -> None:
        from . import blas
        from .backend import configure_cpu_runtime

        note = blas.startup_note()
        if note:
            print(note, file=sys.stderr, flush=True)
        configure_cpu_runtime()
        # Paths with undecodable bytes (held as surrogates) print as the bytes they are.
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(errors="surrogateescape")
        sys.exit(errors_to_exit(main))

    return entry
