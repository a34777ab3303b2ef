"""User-facing errors: raised for bad input, printed by the CLI as one line (no traceback)."""


class ThinkforgeError(Exception):
    """A problem with the user's input (file, row, field, option) rather than a bug."""


class UnknownNameError(ThinkforgeError, KeyError):
    """An unknown registry key (task, reward, backend...)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class SandboxUnavailable(ThinkforgeError):
    """No isolation for untrusted code can be set up here and the user has not opted out of it."""
