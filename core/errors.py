"""The base of every error a user fixes themselves (a flag, a file, an install), as opposed to a bug."""


class UserError(Exception):
    """Raised for mistakes in what the user gave: the CLI prints the message in one line without a traceback
    (anything else shows its traceback: it is a bug to report). Plugins subclass it for their own such errors,
    usually together with ValueError or RuntimeError."""
