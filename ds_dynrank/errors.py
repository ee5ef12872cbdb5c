"""Errors that are the user's to fix: printed as one clear line, never as a traceback wall."""


class UserInputError(ValueError):
    """Bad config, path, dataset or flag. Raised before any training step so nothing is lost."""
