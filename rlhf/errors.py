"""User-facing errors.

Anything a person can cause (a wrong path, a bad config value, too few labels) raises `RlhfError`
with a one-line message that names the thing and the fix. The CLI prints it without a traceback;
the engine sends it to the app as an error event. Anything else is a bug and keeps its traceback.
"""


class RlhfError(Exception):
    """An error caused by input or environment, with a one-line message meant for the user."""

    exit_code = 2


class ConfigError(RlhfError):
    """A config file or CLI flag has an unknown key or a value out of range."""


class StoreError(RlhfError):
    """The workspace database cannot be opened or used."""


class InputFileError(RlhfError):
    """An imported file (prompts, pairs) is malformed; the message starts with `file:line:`."""


class ModelLoadError(RlhfError):
    """A model or tokenizer cannot be loaded."""
