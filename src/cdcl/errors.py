"""User-facing errors: printed as one line by the CLI, never as a traceback."""


class CdclError(Exception):
    """An error caused by user input (a file, a column, a key); the message says what to do."""


class DatasetError(CdclError):
    """A dataset directory is missing, incomplete or malformed."""


class ConfigError(CdclError):
    """A preset or a key=value override is unknown or ill-typed."""
