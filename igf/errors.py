"""The one exception type the driver turns into a one-line message and a non-zero exit."""


class IGFError(Exception):
    """A problem with the user's input, configuration or saved artifacts (not a bug): printed without a traceback."""
