"""The project's error type: a check of the user's input (a flag, a file, the data) that failed. Its message
names the value at fault and the fix; the command line prints it as one line and exits with code 2. Any other
exception is a bug and keeps its traceback."""


class InputError(Exception):
    """A check of the user's input failed; `flag`, when set, is the command-line flag that gave the value
    (the command line names it, the library need not)."""

    def __init__(self, message: str, flag: str | None = None):
        super().__init__(message)
        self.flag = flag


class BadValue(InputError, ValueError):
    """A value the run cannot use: a flag's, a file's content, an image's pixels."""


class MissingFile(InputError, FileNotFoundError):
    """A file or folder the run reads is not there."""


class FileInTheWay(InputError, FileExistsError):
    """A file the run would write exists already."""
