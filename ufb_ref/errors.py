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
