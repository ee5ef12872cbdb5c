"""Errors that are the user's to fix: printed as one clear line, never as a traceback wall."""


class UserInputError(ValueError):
    """Bad config, path, dataset or flag. Raised before any training step so nothing is lost."""


class NonFiniteLossError(RuntimeError):
    """The loss went NaN or Inf on some rank: training stops before that step is applied, so the last checkpoint
    is the last good state."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a failing device or quota): the previous one stays
    `latest` and loadable. `local`: this rank's own write failed (its message has the reason)."""

    def __init__(self, message: str, local: bool) -> None:
        super().__init__(message)
        self.local = local


EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL ("try again later"): the job stopped itself with its progress saved


class Preempted(Exception):
    """The job stopped at an optimizer-step boundary on a signal, after committing a checkpoint of that step."""
