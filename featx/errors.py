"""The one exception featx raises for bad input, and the "did you mean" that goes with it."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable


class FeatxError(ValueError):
    """Bad input: a one-line message naming the bad value, where it came from and what is accepted.

    The command line prints the message alone and exits 2; nothing featx raises for a user's mistake
    is meant to surface as a traceback.
    """


class Unfinished(FeatxError):
    """A run its environment stopped after it started writing: a full disk, a failing device. What it
    finished is kept, and the same call resumes it once the cause is gone. The command line prints the
    message and exits 3 (did not finish), not 2: the input was fine.
    """


class Interrupted(KeyboardInterrupt):
    """A run that stopped before its end and kept what it had finished: a signal (SIGINT, SIGTERM, a
    launcher that died) or another rank of the run failing. Its one-line message says how far it got; the
    same call resumes it. A ``KeyboardInterrupt``, so code that lets Ctrl-C through lets this through too.
    The command line prints the message alone and exits 3 (did not finish).
    """


class FeatxWarning(UserWarning):
    """Something featx did as asked that a user is likely not to expect (an FPN left at its random init
    beside a loaded body). The command line prints it as one ``featx: warning:`` line."""


def did_you_mean(value: str, choices: Iterable[str], n: int = 3) -> str:
    """`` (did you mean `a`, `b`?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(str(value), list(choices), n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + ", ".join(f"`{c}`" for c in close) + "?)"


def listing(names: Iterable[str], limit: int = 12) -> str:
    """Comma-separated backticked names, the tail elided past ``limit``."""
    names = list(names)
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    if len(names) > limit:
        shown += f", … ({len(names) - limit} more)"
    return shown


def too_many_digits(err: ValueError) -> bool:
    """Whether ``err`` is Python's refusal to read an integer past its digit limit
    (``sys.set_int_max_str_digits``): the one bad value ``int(text)`` refuses that is all digits."""
    return "integer string conversion" in str(err)


def long_integer() -> str:
    """``an integer of more than 4300 digits``: how every refusal of such an integer words it (a config
    file's value, ``--upto``, ``--outputs``, a flag's integer)."""
    return f"an integer of more than {sys.get_int_max_str_digits()} digits"


def shortened(text: str, limit: int = 24) -> str:
    """``text`` as a message shows it: whole when short, else its start and its length
    (``99999999…`` (5000 characters))."""
    return text if len(text) <= limit else f"{text[: limit - 8]}… ({len(text)} characters)"


def a_or_an(noun: str) -> str:
    """``noun`` with its indefinite article as it is read: ``a tuple``, ``an OrderedDict``."""
    return f"{'an' if noun[:1] in 'aeiouAEIOU' else 'a'} {noun}"


def one_line(err: BaseException) -> str:
    """An exception's message folded onto one line, control codes (a terminal's colours) spelled out, and
    kept short."""
    text = printable(" ".join(str(err).split()))
    return text if len(text) <= 300 else text[:297] + "..."


def printable(text: str) -> str:
    """``text`` with control codes (``\\x1b[31m``, ``\\x00``) spelled out, so a message cannot drive the
    terminal or break XML; newlines and tabs are kept."""
    return "".join(
        f"\\x{ord(c):02x}" if (ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) < 0xA0 else c
        for c in text
    )
