"""The one exception type for errors a user can act on (bad input, missing things, failed checks).

The CLI prints its message as one line, without a traceback, and exits non-zero.
Every module raises it (or a subclass) for user-facing failures; it imports nothing.
"""


class XmergeError(Exception):
    """An error the user can act on."""
