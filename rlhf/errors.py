"""User-facing errors.

Anything a person can cause (a wrong path, a bad config value, too few labels) raises `RlhfError`
with a one-line message that names the thing and the fix. The CLI prints it without a traceback;
the engine sends it to the app as an error event. Anything else is a bug and keeps its traceback.
"""

import errno

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class RlhfError(Exception):
    """An error caused by input or environment, with a one-line message meant for the user."""

    exit_code = 2


class ConfigError(RlhfError):
    """A config file or CLI flag has an unknown key or a value out of range."""


class StoreError(RlhfError):
    """The workspace database cannot be opened or used."""


class InputFileError(RlhfError):
    """An imported file (prompts, pairs) is malformed; the message starts with `file:line:`."""


class RunCancelled(RlhfError):
    """A stop was asked for before a run's first step (e.g. Ctrl+C while the model loads): no run was made,
    nothing written (a resumed run keeps its status and checkpoint)."""

    exit_code = 130


def cancel_if_stopped(stop_requested: bool, what: str) -> None:
    """Raise RunCancelled when a stop came in while `what` (e.g. "ppo run") was still loading."""
    if stop_requested:
        raise RunCancelled(f"{what}: stopped before its first step, while loading: nothing was written")


class ModelLoadError(RlhfError):
    """A model or tokenizer cannot be loaded."""


def describe_write_error(exc: BaseException) -> str:
    """Why a file could not be written, in a few words: "disk full" when the OS said so (as an OSError, or
    inside a library's own error: safetensors raises SafetensorError "... (os error 28)"), else its first line."""
    text = str(exc).strip()
    if getattr(exc, "errno", None) in DISK_FULL_ERRNOS or any(f"(os error {n})" in text for n in DISK_FULL_ERRNOS):
        return "disk full (free some space)"
    return getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__)
