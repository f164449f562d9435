"""The one error type the CLI turns into a one-line message: ``<file>: <problem>``."""


class CNSError(Exception):
    """An input problem a user can fix; ``path`` names the file, ``code`` is machine-readable."""

    code = "invalid"

    def __init__(self, path: object, message: str, code: str | None = None) -> None:
        self.path = str(path)
        self.message = message
        if code is not None:
            self.code = code
        super().__init__(f"{self.path}: {message}")
