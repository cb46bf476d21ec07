"""CHANGELOG.md is in Keep a Changelog 1.1.0 form and written for users: no private featx names in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("Added", "Changed", "Deprecated", "Removed", "Fixed", "Security")
VERSION = re.compile(r"## \[Unreleased\]|## \[\d+\.\d+\.\d+\] - \d{4}-\d{2}-\d{2}")
# `_name(`, `_name` in backticks, `featx.module._name`, a file under featx/: how featx is made, not what it does
PRIVATE = re.compile(r"(?<![\w.])_[A-Za-z]\w*(?=[(`])|\bfeatx(?:\.\w+)*\._[A-Za-z]\w*|\bfeatx/[\w/]*\.py\b")
HEADER = (
    "[Keep a Changelog](https://keepachangelog.com/en/1.1.0/)",
    "[Semantic Versioning](https://semver.org/spec/v2.0.0.html)",
)


def problems(text: str) -> list[str]:
    """What keeps ``text`` from being a Keep a Changelog file for users, one line each (none: it is one)."""
    lines = text.splitlines()
    found = []
    if not lines or lines[0] != "# Changelog":
        found.append("line 1: the title is not `# Changelog`")
    preamble = text.split("\n## ", 1)[0]
    found += [f"the header does not link {link}" for link in HEADER if link not in preamble]
    version = None
    for number, line in enumerate(lines, 1):
        if line.startswith("## "):
            if not VERSION.fullmatch(line):
                found.append(f"line {number}: {line!r} is not `## [Unreleased]` or `## [x.y.z] - YYYY-MM-DD`")
            version, sections = line, set()
        elif line.startswith("### "):
            section = line[4:]
            if section not in SECTIONS:
                found.append(f"line {number}: section {section!r} is not one of {', '.join(SECTIONS)}")
            elif version is None:
                found.append(f"line {number}: section {section!r} comes before any version")
            elif section in sections:
                found.append(f"line {number}: section {section!r} twice under {version!r}")
            else:
                sections.add(section)
        elif line.startswith("#") and number > 1:
            found.append(f"line {number}: {line!r} is a heading Keep a Changelog does not have")
        for private in PRIVATE.findall(line):
            found.append(f"line {number}: names the private featx symbol or file {private!r}")
    return found


GOOD = """# Changelog

All notable changes to featx are documented in this file.

The format is based on [Keep a Changelog](https://keepachangelog.com/en/1.1.0/),
and this project adheres to [Semantic Versioning](https://semver.org/spec/v2.0.0.html).

## [Unreleased]

### Added
- `featx.verify(model, upto)` says whether a cut is faithful.

## [0.1.0] - 2026-12-07

### Fixed
- `featx ... | head` exits quietly.
"""


def planted(tmp_path: Path, old: str, new: str) -> str:
    """The good changelog with ``old`` replaced by ``new``, written to and read back from a file."""
    assert old in GOOD
    path = tmp_path / "CHANGELOG.md"
    path.write_text(GOOD.replace(old, new))
    return path.read_text()


def test_the_repository_changelog_is_in_keep_a_changelog_form_for_users():
    assert problems((ROOT / "CHANGELOG.md").read_text()) == []


def test_the_example_changelog_is_accepted(tmp_path):
    assert problems(planted(tmp_path, "Unreleased", "Unreleased")) == []


def test_a_changelog_that_does_not_say_it_follows_semantic_versioning_is_refused(tmp_path):
    text = planted(
        tmp_path,
        ",\nand this project adheres to [Semantic Versioning](https://semver.org/spec/v2.0.0.html).",
        ".",
    )
    assert problems(text) == [
        "the header does not link [Semantic Versioning](https://semver.org/spec/v2.0.0.html)"
    ]


def test_a_section_outside_keep_a_changelogs_set_is_refused(tmp_path):
    text = planted(tmp_path, "### Added", "### Improvements")
    assert problems(text) == [
        "line 10: section 'Improvements' is not one of Added, Changed, Deprecated, Removed, Fixed, Security"
    ]


def test_the_same_section_twice_in_one_version_is_refused(tmp_path):
    text = planted(tmp_path, "### Fixed", "### Fixed\n- one\n\n### Fixed")
    assert problems(text) == ["line 18: section 'Fixed' twice under '## [0.1.0] - 2026-12-07'"]


def test_a_version_heading_without_its_date_is_refused(tmp_path):
    text = planted(tmp_path, "## [0.1.0] - 2026-12-07", "## [0.1.0]")
    assert problems(text) == ["line 13: '## [0.1.0]' is not `## [Unreleased]` or `## [x.y.z] - YYYY-MM-DD`"]


def test_a_heading_below_a_section_is_refused(tmp_path):
    text = planted(tmp_path, "### Added\n", "### Added\n#### Verify\n")
    assert problems(text) == ["line 11: '#### Verify' is a heading Keep a Changelog does not have"]


def test_an_entry_calling_a_private_function_is_refused(tmp_path):
    text = planted(tmp_path, "exits quietly.", "exits quietly (`_quiet_pipe()` catches it).")
    assert problems(text) == ["line 16: names the private featx symbol or file '_quiet_pipe'"]


def test_an_entry_naming_a_private_name_in_backticks_is_refused(tmp_path):
    text = planted(tmp_path, "exits quietly.", "exits quietly (`_Recorder` takes its arguments).")
    assert problems(text) == ["line 16: names the private featx symbol or file '_Recorder'"]


def test_an_entry_naming_a_private_name_of_a_featx_module_is_refused(tmp_path):
    text = planted(tmp_path, "exits quietly.", "exits quietly (featx.cli._quiet).")
    assert problems(text) == ["line 16: names the private featx symbol or file 'featx.cli._quiet'"]


def test_an_entry_naming_a_source_file_of_featx_is_refused(tmp_path):
    text = planted(tmp_path, "exits quietly.", "exits quietly (featx/cli/output.py).")
    assert problems(text) == ["line 16: names the private featx symbol or file 'featx/cli/output.py'"]


def test_public_dotted_names_and_dunder_methods_are_not_private(tmp_path):
    text = planted(
        tmp_path,
        "exits quietly.",
        "exits quietly; `torch.nn.Module.__call__()`, `featx.__version__`, `featx.render.svg`.",
    )
    assert problems(text) == []
