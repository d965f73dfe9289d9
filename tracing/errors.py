"""User-facing errors: each carries a one-line message that names the fix. Entry points print it and exit 2."""


class TracingError(Exception):
    """Bad input or an unusable environment; the message is shown to the user as is."""
