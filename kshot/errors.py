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


class DistributedError(KshotError):
    """The processes of a distributed run could not meet, or one of them failed or stopped."""


class KshotWarning(UserWarning):
    """Something the user should know, that did not stop the work (the CLI prints one line)."""


class DataWarning(KshotWarning):
    """Some input was skipped (unreadable images, classes too small to draw tasks from)."""


class WaitingWarning(KshotWarning):
    """kshot waits for another process (one building a cache it needs), and says whom it waits for."""
