"""The one error type for mistakes in the user's input, which the CLIs print as one line."""


class UserError(Exception):
    """A mistake in the user's input (a path, a file, a config key or value).

    The CLI prints the message as one line on stderr and exits with code 2, so the message must name the
    file or field and say what was expected.
    """
