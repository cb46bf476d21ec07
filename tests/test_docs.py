"""docs/json.md lists exactly the keys each ``--json`` document has (and those of the numeric environment each
holds), and the README links it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from featx.cli import main

ROOT = Path(__file__).resolve().parent.parent
MODES = {"eval", "train"}


def documented() -> dict[str, set[str]]:
    """Section (`featx verify`, ...) -> the key paths of its table."""
    sections: dict[str, set[str]] = {}
    current = None
    for line in (ROOT / "docs" / "json.md").read_text().splitlines():
        heading = re.match(r"## `featx (\w+)`", line)
        if heading:
            current = sections.setdefault(heading.group(1), set())
        elif line.startswith("## "):  # a section of its own (the numeric environment)
            current = sections.setdefault(line.removeprefix("## ").lower(), set())
        elif current is not None and (key := re.match(r"\| `([^`]+)` \|", line)):
            current.add(key.group(1))
    return sections


def paths(value: object, prefix: str = "", leaves: frozenset[str] = frozenset()) -> set[str]:
    """Every key path of a JSON document as docs/json.md writes them: `a[].b`, `modes.<mode>.equal`."""
    found: set[str] = set()
    if isinstance(value, dict) and prefix not in leaves:
        for key, item in value.items():
            path = f"{prefix}.<mode>" if key in MODES else (f"{prefix}.{key}" if prefix else key)
            found |= {path} | paths(item, path, leaves)
    elif isinstance(value, list):
        for item in value:
            found |= paths(item, f"{prefix}[]", leaves)
    return found


def run_json(capsys, *argv: str) -> dict:
    main([*argv, "--json"])
    return json.loads(capsys.readouterr().out)


R18 = ["torchvision/resnet18", "--input-shape", "1,3,32,32", "--mode", "eval"]  # glue and residuals


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("verify", ["verify", *R18, "--upto", "fc"]),
        ("sweep", ["sweep", *R18]),
        ("inspect", ["inspect", *R18]),
        ("check", ["check", "through_fc.yaml", "fpn.yaml"]),
        ("build", ["build", "fpn.yaml", "--upto", "layer4"]),  # a flag over a key: `overridden`
        ("export", ["export", "fpn.yaml", "--upto", "layer4", "--random-weights", "--out", "f.safetensors"]),
        ("taps", ["taps", "timm/resnet18", "--input-shape", "1,3,32,32", "--depth", "1"]),  # has feature_info
    ],
)
def test_docs_json_lists_every_key_of_each_document(command, argv, capsys, monkeypatch, tmp_path):
    small = {"model": "torchvision/resnet18", "verify": {"input_shape": [1, 3, 32, 32], "modes": ["eval"]}}
    (tmp_path / "through_fc.yaml").write_text(
        json.dumps({**small, "upto": "fc", "outputs": ["layer4", "fc"]})
    )
    (tmp_path / "fpn.yaml").write_text(
        json.dumps({**small, "upto": "layer4", "outputs": ["layer2", "layer4"], "fpn": {"out_channels": 64}})
    )
    monkeypatch.chdir(tmp_path)
    document = run_json(capsys, *argv)
    if command == "check":
        for item in document["configs"]:
            item.pop("report")  # verify's document, checked above; its keys are listed there
        leaves = {"configs[].outputs", "configs[].built.<mode>.taps", "configs[].environment", "environment"}
        real = paths(document, leaves=frozenset(leaves))
        real.add("configs[].report")
    else:
        # config key -> flag; timm's feature_info entries as timm writes them; the numeric environment,
        # whose keys its own section lists (below)
        real = paths(document, leaves=frozenset({"overridden", "feature_info[]", "environment"}))
    assert documented()[command] == real


def test_docs_json_lists_every_key_of_the_numeric_environment():
    from featx.numerics import environment

    assert documented()["numeric environment"] == set(environment())


def test_the_readme_links_the_json_page_and_nothing_outside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/json.md)" in readme
    assert "../shared" not in readme


def test_the_readme_is_a_front_page_of_at_most_300_lines():
    """The manual is docs/; the README says what featx is, shows each verb once and links the rest."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail to its docs/ page"


def test_contributing_lists_every_benchmark_script():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    listed = set(re.findall(r"^\| `([\w.]+\.py)` \|", text, flags=re.M))
    assert listed == {p.name for p in (ROOT / "benchmarks").glob("*.py")}


def _design_paragraphs() -> list[str]:
    return [p for p in (ROOT / "docs" / "design.md").read_text().split("\n\n") if p.strip()]


@pytest.mark.parametrize(
    "module",
    sorted(str(p.relative_to(ROOT / "featx")) for p in (ROOT / "featx").rglob("*.py")),
)
def test_docs_design_says_where_each_module_of_the_package_lives(module):
    """Each module of featx/ is named in docs/design.md; one in a subpackage (`cli/model.py`), in a paragraph
    that names its subpackage (`cli/`)."""
    package, _, name = module.rpartition("/")
    assert any(
        re.search(rf"(?<![\w.]){re.escape(name)}\b", paragraph)
        and (not package or f"{package}/" in paragraph)
        for paragraph in _design_paragraphs()
    ), f"docs/design.md does not say what featx/{module} does"


def test_docs_ci_lists_every_option_of_the_pytest_plugin():
    import pytest_featx

    class Group:
        def __init__(self) -> None:
            self.options: set[str] = set()

        def addoption(self, *names: str, **_: object) -> None:
            self.options.update(names)

    group = Group()
    pytest_featx.pytest_addoption(type("Parser", (), {"getgroup": lambda self, *a, **k: group})())
    page = (ROOT / "docs" / "ci.md").read_text().split("## The pytest plugin", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(--[\w-]+)", page, flags=re.M))
    assert documented == group.options
