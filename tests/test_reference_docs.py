"""The reference pages say what the code does: docs/config.md lists exactly the keys featx/config.py and
featx/config_keys.py read, docs/cli.md exactly the flags each verb's parser accepts, and every link and cited
file resolves."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from featx import config, config_keys, numerics
from tests import cli_reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def schema_keys() -> set[str]:
    """Every key a config may hold, as docs/config.md writes them: `model`, `fpn.out_channels`, ..."""
    return (
        set(config._KEYS)
        | {f"fpn.{k}" for k in config_keys._FPN_KEYS}
        | {f"verify.{k}" for k in config_keys._VERIFY_KEYS}
        | {f"data.{k}" for k in config_keys.DATA_KEYS}
        | {f"numerics.{k}" for k in numerics.KEYS}
    )


def documented_keys() -> set[str]:
    """The first cell of every row of docs/config.md's key tables (those whose header starts `| key |`)."""
    keys: set[str] = set()
    in_table = False
    for line in (DOCS / "config.md").read_text().splitlines():
        if line.startswith("| key |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and (key := re.match(r"\| `([\w.]+)` \|", line)):
            keys.add(key.group(1))
    return keys


def test_config_md_documents_every_key_the_config_reads():
    assert sorted(schema_keys() - documented_keys()) == []


def test_config_md_documents_no_key_the_config_refuses():
    assert sorted(documented_keys() - schema_keys()) == []


def documented_flags() -> dict[str, set[str]]:
    """docs/cli.md: verb -> the option strings in its section's table."""
    verbs: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in (DOCS / "cli.md").read_text().splitlines():
        if heading := re.match(r"### `featx (\w+)`", line):
            current = verbs.setdefault(heading.group(1), set())
        elif current is not None and line.startswith("| `-"):
            current.update(re.findall(r"`(-[\w-]+)`", line.split(" | ")[0]))
    return verbs


def parser_flags() -> dict[str, set[str]]:
    return {verb: cli_reference.flags(parser) for verb, (_, parser) in cli_reference.verbs().items()}


def test_cli_md_has_a_section_for_every_verb_and_no_other():
    assert sorted(documented_flags()) == sorted(parser_flags())


@pytest.mark.parametrize("verb", sorted(parser_flags()))
def test_cli_md_lists_every_flag_the_verb_accepts(verb):
    assert sorted(parser_flags()[verb] - documented_flags().get(verb, set())) == []


@pytest.mark.parametrize("verb", sorted(parser_flags()))
def test_cli_md_lists_no_flag_the_verb_refuses(verb):
    assert sorted(documented_flags().get(verb, set()) - parser_flags()[verb]) == []


def test_cli_md_is_what_its_generator_writes():
    """Help texts and defaults too: after changing a parser, run `python -m tests.cli_reference`."""
    page = (DOCS / "cli.md").read_text()
    assert page == cli_reference.page(page)


def markdown_pages() -> list[Path]:
    return sorted(
        [p for p in (ROOT / n for n in ("README.md", "CONTRIBUTING.md", "CHANGELOG.md")) if p.exists()]
        + list(DOCS.glob("*.md"))
    )


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code, where brackets are code, not links."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes of ``page``'s headings: lower case, punctuation dropped, spaces to ``-``."""
    found = set()
    for line in re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M).splitlines():
        if heading := re.match(r"#{1,6} (.+)", line):
            found.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return found


def links(page: Path) -> list[str]:
    """Relative link targets: ``[text](target)``, without web and mail addresses."""
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _prose(page.read_text()))
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_points_outside_the_repository(page):
    text = page.read_text()
    assert "../shared" not in text
    assert "/work/" not in text


def cited_files() -> list[tuple[str, str]]:
    """(source file, cited path) for every ``*.md`` file or ``docs/...`` path featx's code names."""
    cited = []
    for source in [*sorted((ROOT / "featx").rglob("*.py")), ROOT / "pytest_featx.py"]:
        for path in re.findall(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md|docs/[\w./-]*\w)\b", source.read_text()):
            cited.append((str(source.relative_to(ROOT)), path))
    return cited


def test_every_file_the_code_cites_exists():
    """A docstring naming ``json.md`` or ``docs/config.md`` names a page in the repository (at its root or in
    docs/), not one beside it."""
    missing = [
        f"{source}: {path}"
        for source, path in cited_files()
        if not (ROOT / path).exists() and not (DOCS / path).exists()
    ]
    assert missing == []


# examples/, benchmarks/ and tests/ cite pages and files in their docstrings and comments (their strings are
# data: the pages a test plants); a path there is a `../` path, a `*.md` page or a path under one of the
# repository's folders.
COMMENTED = ("examples", "benchmarks", "tests")
CITATION = re.compile(
    r"(?<![\w/.-])((?:\.\./)+[\w./-]*\w|(?:[\w-]+/)*[\w-]+\.md|(?:benchmarks|configs|docs|examples|featx|tests)/[\w./-]*\w)\b"
)


def commentary(text: str) -> str:
    """The docstrings and comments of a Python source, one after another."""
    found = [
        docstring
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and (docstring := ast.get_docstring(node, clean=False))
    ]
    found += [
        t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT
    ]
    return "\n".join(found)


def resolves(source: Path, path: str) -> bool:
    """Whether ``path``, cited in ``source``, is a file or folder of the repository: relative to the source's
    folder for a ``../`` path (and inside the repository), else at the root, in docs/ or beside the source."""
    if path.startswith("../"):
        target = (source.parent / path).resolve()
        return target.exists() and target.is_relative_to(ROOT)
    return any((base / path).exists() for base in (ROOT, DOCS, source.parent))


def commentary_citations() -> list[tuple[Path, str]]:
    return [
        (source, path)
        for folder in COMMENTED
        for source in sorted((ROOT / folder).rglob("*.py"))
        for path in CITATION.findall(commentary(source.read_text()))
    ]


def test_every_file_the_examples_benchmarks_and_tests_cite_exists():
    """A docstring or comment naming a ``../`` path, a page or a file of the repository names one that exists:
    nothing beside the repository, nothing that moved away."""
    missing = [
        f"{source.relative_to(ROOT)}: {path}"
        for source, path in commentary_citations()
        if not resolves(source, path)
    ]
    assert missing == []


def test_citations_are_read_from_docstrings_and_comments_only(tmp_path):
    text = '"""Made runnable (see ../shared/seeds)."""\npage = "page.md"  # as docs/cli.md says\n'
    assert CITATION.findall(commentary(text)) == ["../shared/seeds", "docs/cli.md"]
    (tmp_path / "examples").mkdir()
    source = tmp_path / "examples" / "seeds.py"
    assert not resolves(ROOT / "examples" / "seeds.py", "../shared/seeds")  # outside the repository
    assert resolves(ROOT / "examples" / "seeds.py", "../docs/cli.md")
    assert resolves(source, "README.md") and resolves(source, "json.md") and not resolves(source, "nope.md")


@pytest.mark.parametrize("argv", [[], ["verify"], ["build"], ["export"], ["extract"]])
def test_help_says_a_cut_may_be_a_dotted_path(argv, capsys):
    from featx.cli import main

    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    assert "dotted path into a child (layer3.1, stages.2)" in " ".join(capsys.readouterr().out.split())
