"""``featx check --junit``: the configs as JUnit XML test cases."""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING
from xml.etree import ElementTree as ET

from featx.render.check_text import built_lines
from featx.vocab import ERROR, FAITHFUL, NOT_FAITHFUL

if TYPE_CHECKING:
    from featx.checks import Check


def render_junit(result: Check) -> str:
    """JUnit XML: one ``testcase`` per config; ``failure`` when not faithful, ``error`` when it could
    not be checked. The message is ``ConfigCheck.message()``; ``system-out`` holds the verify table."""
    counts = result.counts
    seconds = f"{sum(i.seconds for i in result.items):.3f}"
    attrs = {
        "name": "featx check",
        "tests": str(len(result.items)),
        "failures": str(counts[NOT_FAITHFUL]),
        "errors": str(counts[ERROR]),
        "skipped": "0",
        "time": seconds,
    }
    suites = ET.Element("testsuites", attrs)
    suite = ET.SubElement(
        suites,
        "testsuite",
        {
            **attrs,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    _properties(suite, result.environment)
    for i in result.items:
        case = ET.SubElement(
            suite,
            "testcase",
            {
                "classname": "featx.check",
                "name": _xml(i.config),
                "file": _xml(i.config),
                "time": f"{i.seconds:.3f}",
            },
        )
        # a config that ran in another setting than the run's (its `numerics:`) says how
        _properties(case, {k: v for k, v in i.environment.items() if result.environment.get(k) != v})
        message = i.message()
        if i.outcome != FAITHFUL:
            tag = "failure" if i.outcome == NOT_FAITHFUL else "error"
            node = ET.SubElement(case, tag, {"message": _xml(message.splitlines()[0]), "type": i.outcome})
            node.text = _xml(message)
        if i.reports:
            out = str(i.reports[-1])
            if i.built:
                out += "\n\n" + built_lines(i)
            ET.SubElement(case, "system-out").text = _xml(out)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _properties(parent: ET.Element, env: Mapping[str, object]) -> None:
    """``<properties>`` with one ``<property name="torch" value="2.14.1"/>`` per key of the numeric
    environment (``featx.numerics.environment``; ``null`` and booleans as JSON spells them); none when empty."""
    if not env:
        return
    node = ET.SubElement(parent, "properties")
    for key, value in env.items():
        text = value if isinstance(value, str) else json.dumps(value)
        ET.SubElement(node, "property", {"name": key, "value": _xml(text)})


_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml(text: str) -> str:
    """``text`` with the characters XML 1.0 cannot hold (control codes, lone surrogates) spelled out."""
    return _XML_INVALID.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
