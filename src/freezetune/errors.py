"""User-facing errors.

Anything derived from :class:`FreezetuneError` is a problem with the user's input (a config, a
path, a weights file, an image, a device). The CLI prints its message as one line on stderr and
exits with code 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


def first_line(e: BaseException, limit: int | None = 200) -> str:
    """An exception's message cut to its first line (and ``limit`` characters), or its type's name if empty.

    Library errors (torch, PIL, YAML, onnx) span many lines; a user-facing message quotes one.
    """
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


class FreezetuneError(Exception):
    """Base class for errors caused by user input; ``str(err)`` is the message shown."""

    exit_code = 2


class ConfigError(FreezetuneError):
    """The config file or an override is invalid.

    Attributes:
        problems: One human-readable line per problem, each naming the dotted key and its source.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class FreezeError(FreezetuneError):
    """A freeze spec cannot be applied (unknown pattern, nothing left to train...)."""


class WeightsError(FreezetuneError):
    """A weights file is missing, unreadable, unsafe or does not fit the model."""


class DataError(FreezetuneError):
    """A dataset root, class folder or image is missing or unreadable."""


class DeviceError(FreezetuneError):
    """The requested device is not available."""


class RunDirError(FreezetuneError):
    """The run folder cannot be created, written, or would be overwritten."""


class NonFiniteLossError(FreezetuneError):
    """Training produced a NaN or infinite loss."""


class DemoInputError(FreezetuneError):
    """A demo option has a bad value (not numbers, or vectors of different lengths)."""


class MissingExtraError(FreezetuneError):
    """An optional dependency a command needs is not installed; the message names the pip command."""

    @classmethod
    def of(cls, what: str, package: str, extra: str, why: str = "is not installed") -> MissingExtraError:
        """The one message shape: ``{what} needs {package}, which {why}: pip install 'freezetune[{extra}]'``."""
        return cls(f"{what} needs {package}, which {why}: pip install 'freezetune[{extra}]'")


class RunsFailedError(FreezetuneError):
    """Some runs of a sweep raised; the others finished, and the results were written without them."""


class FreezeIntegrityError(RuntimeError):
    """A frozen tensor changed: a bug in freezetune or in the model, never the user's input.

    Deliberately not a :class:`FreezetuneError`: the CLI keeps its traceback, because there is
    nothing the user could fix.
    """


class WriteError(FreezetuneError, OSError):
    """A file could not be written (disk full, quota, read-only, permissions...).

    Also an :class:`OSError`, so code that handles OS errors keeps working. Build one with
    :meth:`of`; ``str(err)`` is then ``"{path}: cannot write ({cause})"``, plus what to do next
    when the writer knows it. Like every :class:`FreezetuneError` it can be rebuilt from its
    message alone (a comparison's worker process sends only the class name and the message).

    Attributes:
        path: The file being written (None when rebuilt from a message).
        cause: Why, in words ("no space left on device").
        errno: The OS error number, when known.
    """

    def __init__(self, message: str, path=None, cause: str | None = None, errno: int | None = None):
        super().__init__(message)
        self.path, self.cause, self.errno = path, cause, errno

    @classmethod
    def of(cls, path, cause: str, errno: int | None = None, hint: str | None = None) -> WriteError:
        """The error for ``path`` failing because of ``cause``, with ``hint`` (what to do next) appended."""
        message = f"{path}: cannot write ({cause})" + (f"; {hint}" if hint else "")
        return cls(message, path, cause, errno)

    def with_hint(self, hint: str) -> WriteError:
        """The same error, with what to do next added to its message."""
        return WriteError(f"{self}; {hint}", self.path, self.cause, self.errno)


class FolderLockedError(FreezetuneError):
    """Another live process is writing to the folder (it holds the folder's lock)."""
