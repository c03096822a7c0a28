"""optq's own error type: what is wrong and what to do about it, in one message."""


class OptqError(Exception):
    """A problem with the user's input or environment that optq reports without a traceback."""
