"""One error type for everything a user can get wrong, so the CLI can print it plainly.

Each message says what was wrong and what is valid. Subclasses also inherit the builtin a
caller would naturally catch (ValueError, FileNotFoundError)."""


class SaelabError(Exception):
    """Base class: the CLI prints these as `error: <message>` without a traceback."""


class ConfigError(SaelabError, ValueError):
    """A config value, shape or name is not valid."""


class DataError(SaelabError, ValueError):
    """Input data is unusable: NaN/Inf, wrong shape, empty corpus, mismatched cache."""


class MissingFileError(SaelabError, FileNotFoundError):
    """A file or folder saelab needs is not there."""


class CorruptFileError(SaelabError, ValueError):
    """A file is there but cannot be read as what it claims to be."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a message saying what was kept (e.g. the last checkpoint) and how to go on.

    A KeyboardInterrupt, so code that stops on Ctrl-C still stops; the CLI prints the message
    as one line and exits with code 130 (the shell's code for an interrupt)."""
