"""User-facing errors: one line that names the file/key/line and says what to do."""


class NeoxError(Exception):
    """An error caused by the user's input (config, data, paths). The CLI prints it as one line, no traceback."""


class ConfigError(NeoxError):
    """A config file or override is wrong; the message names the file and key."""


class DataError(NeoxError):
    """A dataset or corpus file is missing, malformed or truncated; the message names the file (and line)."""


def ensure_dir(path, what: str):
    """Create directory `path` (and parents) for an output, or raise a NeoxError naming `what` (e.g. "--out").

    Commands call it before the expensive work, so an unwritable destination fails at once, not after it."""
    from pathlib import Path

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NeoxError(f"{what} {path}: cannot create the directory ({e.strerror}); choose a writable path") from None
    return path
