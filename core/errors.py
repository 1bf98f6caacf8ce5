"""Errors with a meaning for the whole program: the user's to fix, or the engine's end."""


class UserError(Exception):
    """Raised for mistakes in what the user gave: the CLI prints the message in one line without a traceback
    (anything else shows its traceback: it is a bug to report). Plugins subclass it for their own such errors,
    usually together with ValueError or RuntimeError."""


class EngineFatalError(RuntimeError):
    """Raised by a backend or scheduler when the engine cannot go on (a broken device, a dead worker): every
    request fails and a server exits non-zero so that a supervisor restarts it. Any other exception in a step
    fails only that step's requests."""


class BackendOutOfMemoryError(RuntimeError):
    """Raised by `Backend.execute` when the device ran out of memory for a step. The engine then preempts the
    step's requests (the backend drops their state in `release`) and runs smaller steps, instead of failing them."""
