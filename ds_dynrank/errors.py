"""Errors that are the user's to fix: printed as one clear line, never as a traceback wall."""


class UserInputError(ValueError):
    """Bad config, path, dataset or flag. Raised before any training step so nothing is lost."""


class NonFiniteLossError(RuntimeError):
    """The loss went NaN or Inf on some rank: training stops before that step is applied, so the last checkpoint
    is the last good state."""
