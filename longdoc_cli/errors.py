"""The one exception type the CLI turns into a one-line message on stderr."""


class LongdocError(Exception):
    """A problem the user can fix (bad input, bad config, missing model); ``exit_code`` 1 or 2."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
