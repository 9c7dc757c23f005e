"""The one exception type for bad user input: CLIs print its message on one line. The
command-line parser of every tool reports through it too."""

import argparse


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
