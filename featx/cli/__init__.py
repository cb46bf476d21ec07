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
    command's own options (argparse names neither)."""
    parser = _parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        options = list(commands.choices[args.command]._option_string_actions)
        flag = next((e.partition("=")[0] for e in extras if e.startswith("-")), "")
        raise FeatxError(
            f"featx {args.command}: unrecognized argument{'s' if len(extras) > 1 else ''} "
            f"{' '.join(f'`{e}`' for e in extras)}{did_you_mean(flag, options) if flag else ''}; "
            f"see `featx {args.command} --help`"
        )
    return args


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
