"""``featx verify | sweep | inspect | check | build | export | extract``: argument parsing only; the work is
done by the API.

Exit codes: 0 faithful (verify, check) or analysis done (sweep, inspect) or every sample extracted
(extract); 1 not faithful, or extract finished with failed samples (listed); 2 bad usage or input, with
one line on stderr and no traceback; 3 extract did not finish (SIGINT or SIGTERM, its torchrun launcher
died, another rank failed): one line saying how many shards are done, and the same command resumes.
``check`` exits with its worst config's code; a reader that closes the pipe early
(``featx verify ... | head``) ends the run quietly with 141, as SIGPIPE does.
``featx extract --verify DIR``: 0 the store is intact, 1 damaged (each problem named), 2 not a store or bad
usage, 3 not finished (no manifest yet).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from featx._version import __version__
from featx.cli import analyse, build, check, export, extract, taps
from featx.cli.flags import _Parser
from featx.errors import FeatxError, FeatxWarning, Interrupted, Unfinished, did_you_mean, one_line


def _parser() -> argparse.ArgumentParser:
    """The whole command line: each verb's parser is its module's (``featx.cli.<verb>``), built from the
    shared flags of ``featx.cli.flags``; torch and the engine are imported inside the commands, once the
    arguments are parsed, so `--help` and `--version` never import them."""
    parser = _Parser(
        prog="featx",
        description="Truncate vision backbones and prove what the cut keeps.",
        epilog="A cut (--upto, --outputs, a config's `upto` and `outputs`) is a child name (kept, inclusive), "
        "a count N / -N, or a dotted path into a child (layer3.1, stages.2). Exit codes: 0 faithful or done, "
        "1 not faithful (or failed samples), 2 bad usage or input, 3 extract did not finish (rerun to "
        "resume). `featx <verb> --help` for a verb's flags; docs/cli.md for all of them.",
    )
    parser.add_argument("--version", action="version", version=f"featx {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    analyse.add_parsers(commands)
    export.add_parser(commands)
    check.add_parser(commands)
    build.add_parser(commands)
    extract.add_parser(commands)
    taps.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    with warnings.catch_warnings():
        show = warnings.showwarning
        warnings.showwarning = functools.partial(_show_warning, show)
        return _run(argv)


def _show_warning(
    show: Callable[..., None], message: Warning | str, category: type[Warning], *args: object
) -> None:
    """A ``FeatxWarning`` as one ``featx: warning:`` line on stderr; any other warning as Python shows it."""
    if issubclass(category, FeatxWarning):
        print(f"featx: warning: {message}", file=sys.stderr)
    else:
        show(message, category, *args)


def _run(argv: Sequence[str] | None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return code
    except Unfinished as err:  # a full disk mid-run: the input was fine, and the same command resumes
        print(f"featx: error: {err}", file=sys.stderr)
        return 3
    except FeatxError as err:
        print(f"featx: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:  # a run that did not finish and can be resumed
        print(f"featx: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("featx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): not an error. Point stdout at /dev/null so the interpreter's
        # final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except Exception as err:  # not featx's verdict, so never exit 1; the traceback on request
        if os.environ.get("FEATX_DEBUG"):
            raise
        print(
            f"featx: error: {type(err).__name__}: {one_line(err)} (FEATX_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 2


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments; an unknown one is refused naming the command, with a "did you mean" over that
    command's own options (argparse names neither), before any other complaint: a required argument it
    hides is missing only because the unknown one was mistyped. One before the command is refused as
    featx's own (it takes only --help and --version there)."""
    parser = _parser()
    given = list(sys.argv[1:] if argv is None else argv)
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    _refuse_before_command(parser, commands, given)
    try:
        args, extras = parser.parse_known_args(given)
    except FeatxError:
        unknown = _unknown(parser, commands, given)
        if unknown is None:
            raise
        args, extras = unknown
    if extras:
        options = list(commands.choices[args.command]._option_string_actions)
        flag = next((e.partition("=")[0] for e in extras if e.startswith("-")), "")
        raise FeatxError(
            f"featx {args.command}: unrecognized argument{'s' if len(extras) > 1 else ''} "
            f"{' '.join(f'`{e}`' for e in extras)}{did_you_mean(flag, options) if flag else ''}; "
            f"see `featx {args.command} --help`"
        )
    return args


def _refuse_before_command(
    parser: argparse.ArgumentParser, commands: argparse._SubParsersAction, argv: list[str]
) -> None:
    """Refuse a flag before the command that is not featx's own (``featx --frob verify ...``): argparse
    would hand it to the command, or complain the command is missing."""
    for i, token in enumerate(argv):
        if not token.startswith("-") or token == "--":
            return
        flag = token.partition("=")[0]
        if flag in parser._option_string_actions:
            continue
        verb = next((t for t in argv[i + 1 :] if t in commands.choices), None)
        if verb is not None and flag in commands.choices[verb]._option_string_actions:
            raise FeatxError(
                f"unrecognized argument `{token}` before the command: it is a flag of `featx {verb}`, "
                f"so it goes after `{verb}` (see `featx {verb} --help`)"
            )
        own = [o for o in parser._option_string_actions if o.startswith("--")]
        theirs = [o for o in commands.choices[verb]._option_string_actions] if verb is not None else []
        raise FeatxError(
            f"unrecognized argument `{token}`{did_you_mean(flag, own + theirs)}; before the command featx "
            f"takes {', '.join(f'`{o}`' for o in own)} only, a command's flags go after it "
            f"(see `featx {verb + ' ' if verb else ''}--help`)"
        )


def _unknown(
    parser: argparse.ArgumentParser, commands: argparse._SubParsersAction, argv: list[str]
) -> tuple[argparse.Namespace, list[str]] | None:
    """The arguments parsed with nothing required, when that leaves unknown ones over: they are the error
    to report, not the required argument a mistyped flag left missing (None otherwise)."""
    for action in [*parser._actions, *(a for p in commands.choices.values() for a in p._actions)]:
        action.required = False
    try:
        args, extras = parser.parse_known_args(argv)
    except FeatxError:
        return None
    return (args, extras) if extras and getattr(args, "command", None) else None


_VERBS: dict[str, Callable[[argparse.Namespace], int]] = {
    "verify": analyse.run,
    "sweep": analyse.run,
    "inspect": analyse.run,
    "export": export.run,
    "check": check.run,
    "build": build.run,
    "extract": extract.run,
    "taps": taps.run,
}


def _main(argv: Sequence[str] | None) -> int:
    args = _parse(argv)
    return _VERBS[args.command](args)
