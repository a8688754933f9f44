"""Errors a user can cause: the CLI prints their message as one line and exits non-zero."""


class CapcliError(Exception):
    """A user-facing error; its message is one clear line."""
