"""The exception that reaches users as a plain message, and the one a cancelled search stops
with."""


class SearchCancelled(Exception):
    """The search's job was cancelled; raised from inside long work (a measurement, a
    fine-tune) so that it stops there."""


class ArchtreeError(Exception):
    """A problem with the user's input or environment.

    The message is one line that says what is wrong and what to do about it; the CLI prints it
    without a traceback and exits non-zero, the API answers it as a 4xx detail.
    """


def first_line(error: BaseException) -> str:
    """The first line of an error's message ("" when it has none)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def a_or_an(word: str) -> str:
    """`word` after its indefinite article, by its first letter: "an int", "a list"."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"
