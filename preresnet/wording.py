"""Words the messages share, in a leaf module (it imports nothing of the package), so that any
module can use them without joining another's imports."""


def counted(count: int, noun: str) -> str:
    """'1 run', '2 runs'."""
    return f"{count} {noun}" + ("" if count == 1 else "s")
