"""The one exception type the user sees: it names the problem and the fix."""


class HobbitError(Exception):
    """An error caused by input the user can fix. The CLI prints it without a traceback."""
