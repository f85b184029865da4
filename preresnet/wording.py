"""Words the messages share, in a leaf module (it imports nothing of the package), so that any
module can use them without joining another's imports."""


def counted(count: int, noun: str) -> str:
    """'1 run', '2 runs'."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def percent(value: float | None) -> str:
    """A fraction as a percentage with two decimals; '-' where there is none (a run not finished)."""
    return "-" if value is None else f"{100 * value:.2f}%"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name where it has none): one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
