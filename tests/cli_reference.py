"""docs/cli.md's flag tables, written from the argparse parsers themselves (``featx.cli._parser``).

``python -m tests.cli_reference`` rewrites the part of docs/cli.md between the two ``generated`` markers
(one section per verb: what it does, its usage line and a table of every argument) and leaves the prose
around it alone; ``python -m tests.cli_reference --check`` exits 1 when the page is out of date.
tests/test_reference_docs.py fails when someone changes a flag and forgets to.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from featx.cli import _parser

PAGE = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
BEGIN = (
    "<!-- generated: `python -m tests.cli_reference` writes from here to the end marker; edit featx/cli/ -->"
)
END = "<!-- end of generated -->"
WIDTH = 100  # usage lines wrapped here, whatever the terminal


def verbs() -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """Each verb's one-line help and parser, in the order ``featx --help`` lists them."""
    parser = _parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help or "" for choice in commands._choices_actions}
    return {name: (helps[name], sub) for name, sub in commands.choices.items()}


def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments a user types: positionals first, then the options, as ``--help`` lists them."""
    shown = [
        a for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
    ]
    return [a for a in shown if not a.option_strings] + [a for a in shown if a.option_strings]


def flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string a verb accepts (``--upto``...), ``-h``/``--help`` aside."""
    return {s for a in arguments(parser) for s in a.option_strings}


def _name(action: argparse.Action) -> str:
    if action.option_strings:
        return ", ".join(f"`{s}`" for s in action.option_strings)
    return f"`{action.metavar or action.dest.upper()}`"


def _value(action: argparse.Action) -> str:
    if action.nargs == 0 or not action.option_strings:  # a switch; a positional is its own name
        return ""
    if action.choices is not None:
        text = "|".join(map(str, action.choices))
    else:
        text = str(action.metavar or action.dest.upper())
    return f"`{text}`"


def _meaning(action: argparse.Action) -> str:
    text = " ".join(str(action.help or "").split())
    if action.nargs == "+":
        text += " (one or more)"
    elif isinstance(action, argparse._AppendAction) and "repeatable" not in text:
        text += " (repeatable)"
    if action.required or (not action.option_strings and action.nargs not in ("?", "*")):
        text += " (required)"
    if action.nargs != 0 and action.default not in (None, [], argparse.SUPPRESS) and "default" not in text:
        text += f" (default: {action.default})"
    return text


def _cell(text: str) -> str:
    """Text as one Markdown table cell: ``|`` escaped, ``<name>`` shown rather than read as HTML."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def section(verb: str, summary: str, parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    usage = formatter.format_help().strip()
    lines = [f"### `featx {verb}`", "", summary[:1].upper() + summary[1:] + "."]
    if parser.description:
        lines += ["", " ".join(parser.description.split())]
    lines += ["", "```text", usage, "```", "", "| argument | value | meaning |", "|---|---|---|"]
    lines += [f"| {_name(a)} | {_cell(_value(a))} | {_cell(_meaning(a))} |" for a in arguments(parser)]
    return "\n".join(lines)


def generated() -> str:
    """The text between the markers."""
    return "\n\n".join(section(verb, summary, parser) for verb, (summary, parser) in verbs().items())


def page(current: str) -> str:
    """``current`` (docs/cli.md's text) with its generated part written anew."""
    head, begin, rest = current.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise SystemExit(f"{PAGE}: the markers {BEGIN!r} and {END!r} are missing")
    return f"{head}{BEGIN}\n\n{generated()}\n\n{END}{tail}"


def main(argv: list[str]) -> int:
    current = PAGE.read_text()
    new = page(current)
    if "--check" in argv:
        if new != current:
            print(f"{PAGE} is out of date: run `python -m tests.cli_reference`", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
