"""The one exception type users see.

Library code raises :class:`PeftkitError` with a message that names the key, file or adapter at fault and
says how to fix it; the CLI prints it as a single ``Error: ...`` line and exits non-zero. Anything else that
escapes is a bug in peftkit and keeps its traceback.
"""


class PeftkitError(Exception):
    """A problem with the user's input, stated in one line that says how to fix it."""


class RecipeError(PeftkitError):
    """Every problem found in a recipe, reported together."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        if len(problems) == 1:
            message = f"{source}: {problems[0]}"
        else:
            listed = "; ".join(problems)
            message = f"{source}: {len(problems)} problems: {listed}"
        super().__init__(message)


def first_line(exc: BaseException) -> str:
    """The first line of a library's error message (its type's name when it has none): what a one-line error quotes."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
