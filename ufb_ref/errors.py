"""The one exception type for bad user input: CLIs print its message on one line."""


class UFBError(ValueError):
    """A problem with the user's input (config, checkpoint, text, arguments)."""
