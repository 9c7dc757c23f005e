"""The one exception type for bad user input: CLIs print its message on one line. The
command-line parser of every tool reports through it too."""

import argparse
import os
import sys


class UFBError(ValueError):
    """A problem with the user's input (config, checkpoint, text, arguments)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose command-line errors are UFBErrors: one line ("error: ...", exit
    status 2, from the tool's error handler) instead of argparse's usage block."""

    def error(self, message):
        raise UFBError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        # argparse reports a missing required option before an unknown one, so a mistyped
        # option name ("--promt") would never be named: look for unknown ones first.
        relaxed = [a for a in (*self._actions, *self._mutually_exclusive_groups) if a.required]
        for a in relaxed:
            a.required = False
        try:
            extras = self.parse_known_args(args, argparse.Namespace())[1]
        except UFBError:
            extras = []  # reported by the full parse below
        finally:
            for a in relaxed:
                a.required = True
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return super().parse_args(args, namespace)


def command_name(module: str) -> str:
    """The command as the user typed it, for usage lines and "see ... --help": the console
    script (``ufb-generate``), ``python -m MODULE``, or ``python SCRIPT.py``; ``python -m
    MODULE`` when the tool runs inside another program (a test, a notebook)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name in (module, f"{module}.__main__"):
        return f"python -m {module}"
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    base = os.path.basename(argv0)
    if base.startswith("ufb-"):
        return base
    if spec is None and base.endswith(".py") and os.path.abspath(argv0) == os.path.abspath(
            getattr(sys.modules.get("__main__"), "__file__", "") or ""):
        return f"python {argv0}"
    return f"python -m {module}"
