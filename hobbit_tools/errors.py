"""The one exception type the user sees: it names the problem and the fix."""


class HobbitError(Exception):
    """An error caused by input the user can fix. The CLI prints it without a traceback."""


class BudgetBelowMinimum(HobbitError):
    """A cache budget below one layer's top-k experts per cache; `minimum` is what it needs."""

    def __init__(self, message: str, minimum: int):
        super().__init__(message)
        self.minimum = minimum
