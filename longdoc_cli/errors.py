"""The one exception type the CLI turns into a one-line message on stderr."""


class LongdocError(Exception):
    """A problem the user can fix (bad input, bad config, missing model); ``exit_code`` 1 or 2."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# How a failed allocation reads: CUDA's "out of memory" and the CPU allocator's wording.
_OOM_WORDS = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation (MemoryError, or torch's RuntimeError for one)."""
    return isinstance(error, MemoryError) or any(w in str(error).lower() for w in _OOM_WORDS)
