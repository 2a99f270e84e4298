"""User-facing errors: one line that names the file/key/line and says what to do."""


class NeoxError(Exception):
    """An error caused by the user's input (config, data, paths). The CLI prints it as one line, no traceback."""


class ConfigError(NeoxError):
    """A config file or override is wrong; the message names the file and key."""


class DataError(NeoxError):
    """A dataset or corpus file is missing, malformed or truncated; the message names the file (and line)."""
