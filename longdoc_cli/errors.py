"""The errors the library raises for problems a user can fix; the CLI turns each into one line on
stderr and picks the exit code from its type (cli.exit_code: 2 for a UsageError, else 1)."""


class LongdocError(Exception):
    """A problem the user can fix in what was given to work on: a bad document, data file or model
    directory, a missing model, an output that cannot be written."""


class UsageError(LongdocError):
    """A problem in how longdoc was asked: a bad option, argument, config value or environment
    variable."""


# How a failed allocation reads: CUDA's "out of memory" and the CPU allocator's wording.
_OOM_WORDS = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation (MemoryError, or torch's RuntimeError for one)."""
    return isinstance(error, MemoryError) or any(w in str(error).lower() for w in _OOM_WORDS)
