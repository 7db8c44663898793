"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class UpcycleError(Exception):
    """A problem with the user's input, with a message that names the input and the fix."""
