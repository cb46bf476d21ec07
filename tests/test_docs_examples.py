"""Every example in README.md, docs/*.md and CONTRIBUTING.md runs and prints what the page says it prints.

How a page marks its examples (the conventions every page follows):

- A fenced block tagged `console` is a shell transcript. Each line starting with `$ ` is a command (a line
  ending in `\\` continues on the next); the lines after it, up to the next `$ ` line, are its expected output,
  stdout and stderr as a terminal shows them. A command must exit 0 unless its output ends with `[exit N]`.
- A fenced block tagged `python` is run: all python blocks of a page in order, in one namespace. If the next
  block (blank lines between allowed) is tagged `output`, the python block's stdout must match it.
- In expected output a line that is exactly `...` matches any number of lines (none included), and `...`
  inside a line matches any text on that line. Trailing spaces and trailing blank lines are not compared.
- `<!-- file: NAME -->` on the line just before a fenced block (any tag) writes the block's content to NAME
  in the page's folder when the page reaches it; such a block is written, not run.
- `<!-- slow: reason -->` or `<!-- torchrun: reason -->` on the line just before a `console` or `python`
  block: run only by `pytest -m slow` / `pytest -m torchrun` (the page is then run whole again, with those
  blocks), for an example too long for the default loop or one that needs real torchrun ranks.
- `<!-- skip: reason -->` on the line just before a `console` or `python` block: not run. No page skips one
  now (a test says so): an example that can run here runs, in the default loop or under a mark.
- Other tags (`text`, `yaml`, `bash`, `json`, `toml`, ...) are not run.

Where a page runs: each page in its own empty temporary folder (pages share no state), every command in a
fresh `bash -c` there (so `cd` and variables do not carry over between `$ ` lines), with

- `HF_HUB_OFFLINE=1` (nothing is downloaded) and `PYTHONUNBUFFERED=1` (stdout and stderr interleave as on a
  terminal);
- `featx` on PATH: a script running `python -m featx` with this test's interpreter, and this repository's root
  first on PYTHONPATH — so the commands test this checkout, whichever `featx` console script is installed
  (`featx` itself finds `examples.seed_toy:ResN` from any folder when installed from a clone);
- python blocks run in this process, with the page's folder as the working directory and torch's RNG state
  restored after the page.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(
    str(p.relative_to(ROOT))
    for p in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")]
    if p.exists()
)
# Pages that are tables and contracts to look things up in: no example of their own is required.
REFERENCE_PAGES = {
    "CONTRIBUTING.md",
    "docs/cli.md",
    "docs/config.md",
    "docs/design.md",
    "docs/json.md",
    "docs/performance.md",
    "docs/taps_matrix.md",
    "docs/zoo.md",
}
RUN = {"console", "python"}
MARKS = ("slow", "torchrun")  # `<!-- slow: ... -->`: a block only `pytest -m slow` runs, with its page
COMMAND_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    """One fenced block of a page: its tag, its content, the line of its opening fence and its comment."""

    tag: str
    text: str
    line: int
    file: str | None = None
    skip: str | None = None
    mark: str | None = None  # `slow` or `torchrun`: run only under that pytest mark
    output: Block | None = None  # the `output` block right after a python block


@dataclass(frozen=True)
class Command:
    command: str
    expected: list[str]
    exit: int
    line: int


def blocks(markdown: str) -> list[Block]:
    """The fenced blocks of a page in order; an `output` block is attached to the python block before it."""
    lines = markdown.splitlines()
    found: list[Block] = []
    previous_end = -2  # index of the last closing fence
    i = 0
    while i < len(lines):
        opening = re.match(r"^(`{3,})\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        fence, tag = opening.groups()
        end = next(
            (j for j in range(i + 1, len(lines)) if re.fullmatch(rf"{fence}`*\s*", lines[j])),
            len(lines),
        )
        kinds = "|".join(("file", "skip", *MARKS))
        comment = re.fullmatch(rf"<!--\s*({kinds}):\s*(.*?)\s*-->", lines[i - 1].strip()) if i else None
        kind = comment.group(1) if comment else None
        block = Block(
            tag=tag,
            text="".join(f"{line}\n" for line in lines[i + 1 : end]),
            line=i + 1,
            file=comment.group(2) if comment and kind == "file" else None,
            skip=comment.group(2) if comment and kind == "skip" else None,
            mark=kind if kind in MARKS else None,
        )
        between = lines[previous_end + 1 : i]
        if tag == "output" and found and found[-1].tag == "python" and not any(s.strip() for s in between):
            found[-1] = Block(**{**found[-1].__dict__, "output": block})
        else:
            found.append(block)
        previous_end = end
        i = end + 1
    return found


def commands(transcript: str, first_line: int = 1) -> list[Command]:
    """A console block's commands, each with its expected output lines and exit status."""
    found: list[Command] = []
    lines = transcript.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            raise ValueError(f"line {first_line + i}: a transcript starts with a `$ ` command: {lines[i]!r}")
        line = first_line + i
        command = lines[i][2:]
        while command.endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command[:-1].rstrip() + " " + lines[i].strip()
        i += 1
        expected = []
        while i < len(lines) and not lines[i].startswith("$ "):
            expected.append(lines[i])
            i += 1
        while expected and not expected[-1].strip():
            expected.pop()
        status = 0
        if expected and (exit_line := re.fullmatch(r"\[exit (\d+)\]", expected[-1].strip())):
            status = int(exit_line.group(1))
            expected.pop()
        found.append(Command(command, expected, status, line))
    return found


def _clean(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def matches(expected: list[str] | str, actual: str) -> bool:
    """Whether `actual` is what `expected` says, `...` lines and inline `...` matching what varies."""
    if isinstance(expected, str):
        expected = expected.splitlines()
    pattern = "".join(
        r"(?:[^\n]*\n)*?" if line.strip() == "..." else ".*?".join(map(re.escape, line.split("..."))) + r"\n"
        for line in _clean("\n".join(expected))
    )
    text = "".join(f"{line}\n" for line in _clean(actual))
    return re.fullmatch(pattern, text) is not None


def _diff(expected: list[str], actual: str) -> str:
    return "\n".join(
        difflib.unified_diff(_clean("\n".join(expected)), _clean(actual), "expected", "actual", lineterm="")
    )


def environment(folder: Path) -> dict[str, str]:
    """The environment of a page's commands: `featx` on PATH is this checkout's (see the module docstring)."""
    bin_dir = folder.parent / f"{folder.name}-bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "featx"
    script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m featx "$@"\n')
    script.chmod(0o755)
    # not the outer pytest's own variables (xdist's PYTEST_XDIST_WORKER...): a page's `pytest` runs as a user's would
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env.update(
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        PATH=f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    # a page's output is what a user sees in a terminal: pytest prints whole messages, not a line each, on CI
    for key in ("COLUMNS", "CI", "BUILD_NUMBER"):
        env.pop(key, None)
    return env


def run_page(markdown: str, name: str, folder: Path, marks: frozenset[str] = frozenset()) -> int:
    """Run every example of one page in `folder`; raise AssertionError naming the first that disagrees.

    Blocks marked `slow` or `torchrun` run only when `marks` holds their mark. Returns how many examples ran
    (written files, skipped blocks and marked blocks not run not counted)."""
    env = environment(folder)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    ran = 0
    for block in blocks(markdown):
        if block.file:
            target = folder / block.file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.text)
        elif block.tag not in RUN or block.skip or (block.mark and block.mark not in marks):
            continue
        elif block.tag == "console":
            for command in commands(block.text, block.line + 1):
                proc = subprocess.run(
                    ["bash", "-c", command.command],
                    cwd=folder,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=COMMAND_TIMEOUT_S,
                    check=False,
                )
                where = f"{name}:{command.line}: $ {command.command}"
                if not matches(command.expected, proc.stdout):
                    raise AssertionError(
                        f"{where}\nprinted other than the page says:\n{_diff(command.expected, proc.stdout)}"
                    )
                if proc.returncode != command.exit:
                    raise AssertionError(
                        f"{where}\nexited {proc.returncode}, the page says {command.exit}:\n{proc.stdout}"
                    )
                ran += 1
        else:
            stdout = io.StringIO()
            cwd = os.getcwd()
            os.chdir(folder)
            try:
                with contextlib.redirect_stdout(stdout):
                    exec(compile(block.text, f"{name}:{block.line + 1}", "exec"), namespace)
            finally:
                os.chdir(cwd)
            if block.output is not None and not matches(block.output.text, stdout.getvalue()):
                expected = block.output.text.splitlines()
                raise AssertionError(
                    f"{name}:{block.line}: the python block printed other than its output block says:\n"
                    f"{_diff(expected, stdout.getvalue())}"
                )
            ran += 1
    return ran


@pytest.mark.parametrize("page", PAGES)
def test_every_example_of_the_page_runs_as_written(page, tmp_path):
    folder = tmp_path / "page"
    folder.mkdir()
    with torch.random.fork_rng(devices=[]):  # a page's `torch.manual_seed` stays on the page
        run_page((ROOT / page).read_text(), page, folder)


def _marked_pages() -> list[object]:
    """`(page, mark)` for each page with a block marked `slow` or `torchrun`, under that pytest mark."""
    return [
        pytest.param(page, mark, marks=getattr(pytest.mark, mark), id=f"{page}-{mark}")
        for page in PAGES
        for mark in MARKS
        if any(b.mark == mark for b in blocks((ROOT / page).read_text()))
    ]


@pytest.mark.parametrize(("page", "mark"), _marked_pages())
def test_the_page_runs_with_its_marked_examples(page, mark, tmp_path):
    folder = tmp_path / "page"
    folder.mkdir()
    with torch.random.fork_rng(devices=[]):
        run_page((ROOT / page).read_text(), page, folder, frozenset({mark}))


def test_no_page_skips_an_example():
    skipped = [
        f"{page}:{b.line} ({b.skip})" for page in PAGES for b in blocks((ROOT / page).read_text()) if b.skip
    ]
    assert not skipped, (
        f"skipped examples: {skipped}; run them (mark a long one `<!-- slow: ... -->`, one that needs torchrun "
        "ranks `<!-- torchrun: ... -->`)"
    )


def test_no_transcript_elides_with_an_ellipsis_character():
    """`…` is not the runner's `...`: a transcript eliding with it would fail, or it was never run."""
    found = [
        f"{page}:{b.line}"
        for page in PAGES
        for b in blocks((ROOT / page).read_text())
        if b.tag in RUN | {"output"} and "…" in b.text
    ]
    assert not found, f"transcripts with `…`: {found}"


@pytest.mark.parametrize("page", sorted(set(PAGES) - REFERENCE_PAGES))
def test_each_page_that_is_not_a_reference_has_an_executed_example(page):
    executed = [
        b
        for b in blocks((ROOT / page).read_text())
        if b.tag in RUN and not b.skip and not b.file and not b.mark
    ]
    assert executed, (
        f"{page} runs no example: add a `console` or `python` block, or list it as a reference page"
    )


# The runner itself: it must fail on what is wrong, or every page above passes vacuously.


def test_a_line_of_three_dots_matches_any_number_of_lines():
    assert matches(["a", "...", "d"], "a\nb\nc\nd\n")
    assert matches(["a", "...", "d"], "a\nd\n")
    assert not matches(["a", "...", "d"], "a\nb\nc\n")


def test_three_dots_inside_a_line_match_any_text_on_that_line_only():
    assert matches(["took ... s (... images/s)"], "took 1.25 s (3.1 images/s)\n")
    assert not matches(["took ... s"], "took 1.25 ms\n")
    assert not matches(["a ... b"], "a x\ny b\n")


def test_output_must_match_every_line_exactly_without_dots():
    assert matches(["faithful: yes"], "faithful: yes  \n\n")
    assert not matches(["faithful: yes"], "faithful: no\n")
    assert not matches(["faithful: yes"], "faithful: yes\nmore\n")
    assert not matches(["a", "b"], "a\n")


def test_a_transcript_splits_into_commands_with_their_output_and_exit_status():
    found = commands("$ featx a \\\n    --b 1\nout 1\nout 2\n\n$ featx c\n[exit 2]\n", first_line=10)
    assert found == [
        Command("featx a --b 1", ["out 1", "out 2"], 0, 10),
        Command("featx c", [], 2, 15),
    ]


def test_a_wrong_transcript_fails_with_the_command_and_a_diff(tmp_path):
    page = "```console\n$ echo hello\nhallo\n```\n"
    with pytest.raises(AssertionError, match=r"(?s)page.md:2: \$ echo hello.*-hallo\n\+hello"):
        run_page(page, "page.md", tmp_path)


def test_a_nonzero_exit_fails_unless_the_transcript_says_it(tmp_path):
    with pytest.raises(AssertionError, match="exited 3, the page says 0"):
        run_page("```console\n$ echo no; exit 3\nno\n```\n", "page.md", tmp_path)
    assert run_page("```console\n$ echo no; exit 3\nno\n[exit 3]\n```\n", "page.md", tmp_path) == 1
    with pytest.raises(AssertionError, match="exited 0, the page says 3"):
        run_page("```console\n$ echo no\nno\n[exit 3]\n```\n", "page.md", tmp_path)


def test_stderr_is_compared_with_stdout_in_terminal_order(tmp_path):
    page = "```console\n$ echo out; echo err >&2; echo out2\nout\nerr\nout2\n```\n"
    assert run_page(page, "page.md", tmp_path) == 1


def test_python_blocks_share_one_namespace_and_an_output_block_is_compared(tmp_path):
    page = "```python\nx = 2\n```\n\n```python\nprint(x * 21)\n```\n\n```output\n42\n```\n"
    assert run_page(page, "page.md", tmp_path) == 2
    wrong = page.replace("42", "41")
    with pytest.raises(
        AssertionError, match=r"page.md:5: the python block printed other.*\n(?s:.*)-41\n\+42"
    ):
        run_page(wrong, "page.md", tmp_path)


def test_a_python_block_that_raises_fails_the_page(tmp_path):
    with pytest.raises(ZeroDivisionError):
        run_page("```python\n1 / 0\n```\n", "page.md", tmp_path)


def test_a_file_comment_writes_the_block_for_what_follows(tmp_path):
    page = "<!-- file: cfg/a.yaml -->\n```yaml\nupto: layer2\n```\n\n```console\n$ cat cfg/a.yaml\nupto: layer2\n```\n"
    assert run_page(page, "page.md", tmp_path) == 1
    assert (tmp_path / "cfg" / "a.yaml").read_text() == "upto: layer2\n"


def test_a_skip_comment_and_other_tags_are_not_run(tmp_path):
    page = (
        "<!-- skip: needs a GPU -->\n```console\n$ exit 1\n```\n\n"
        "```bash\nexit 1\n```\n\n```text\n$ exit 1\n```\n\n<!-- skip: network -->\n```python\n1 / 0\n```\n"
    )
    assert run_page(page, "page.md", tmp_path) == 0


def test_a_marked_block_runs_only_under_its_mark(tmp_path):
    page = (
        "```console\n$ echo a\na\n```\n\n<!-- slow: long -->\n```console\n$ echo b\nb\n```\n\n"
        "<!-- torchrun: ranks -->\n```python\nprint(1 / 0)\n```\n"
    )
    assert [b.mark for b in blocks(page)] == [None, "slow", "torchrun"]
    assert run_page(page, "page.md", tmp_path) == 1
    assert run_page(page, "page.md", tmp_path, frozenset({"slow"})) == 2
    with pytest.raises(ZeroDivisionError):
        run_page(page, "page.md", tmp_path, frozenset({"torchrun"}))


def test_featx_in_a_transcript_is_this_checkout(tmp_path):
    page = (
        "```console\n"
        "$ featx --version\nfeatx ...\n"
        '$ python -c "import featx, examples; print(featx.__file__, examples.__file__)"\n'
        f"{ROOT}/featx/__init__.py {ROOT}/examples/__init__.py\n"
        "```\n"
    )
    assert run_page(page, "page.md", tmp_path) == 2
