"""The one error type of the preprocessing stage: a message a person can act on (what, where, the fix)."""


class PrepareError(ValueError):
    """Bad input or a missing/wrong preprocessing checkpoint. The CLI prints the message and exits 2."""
