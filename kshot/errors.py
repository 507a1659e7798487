"""The errors kshot raises on bad input.

Every error a user can cause (a missing archive, an impossible task, an unreadable checkpoint)
is a :class:`KshotError` whose message is one line saying what was wrong and what to do. The
command line prints that line and exits with status 2; the Python API lets it propagate.
"""


class KshotError(Exception):
    """Base class: bad input that the user can fix."""


class DataError(KshotError):
    """A dataset or archive is missing, corrupt, or cannot give what was asked of it."""


class ConfigError(KshotError):
    """A setting is unknown, malformed, or inconsistent with another."""


class CheckpointError(KshotError):
    """A checkpoint is missing, unreadable, or was not written by kshot."""


class TrainingError(KshotError):
    """Training cannot go on as set: a loss or meta-gradient is no longer a finite number, or the
    run directory cannot be written (read-only, full)."""


class TrainingStopped(KshotError):
    """A run stopped at a step boundary on a signal, its checkpoint written (the same command
    resumes from there). The command line exits with the shell's status for that signal."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, as for a process the signal ended."""
        return 128 + self.signal_number


class DistributedError(KshotError):
    """The processes of a distributed run could not meet, or one of them failed or stopped."""


class KshotWarning(UserWarning):
    """Something the user should know, that did not stop the work (the CLI prints one line)."""


class DataWarning(KshotWarning):
    """Some input was skipped (unreadable images, classes too small to draw tasks from)."""


class WaitingWarning(KshotWarning):
    """kshot waits for another process (one building a cache it needs), and says whom it waits for."""
