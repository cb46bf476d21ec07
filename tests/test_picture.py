"""The picture of a cut: a self-contained SVG (``featx verify --svg``) and a Mermaid diagram (Markdown).

Both are rendered in a real headless browser (Debian's ``chromium``; ``.ci/run`` installs it and Mermaid's
own ``mermaid.min.js``). Without a browser these tests skip locally and fail where
``FEATX_REQUIRE_BROWSER=1`` (CI).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy
import pytest
import torch
import torchvision
import yaml
from PIL import Image

import featx
from featx.cli import main
from featx.render.markdown import render_markdown
from featx.render.mermaid import mermaid
from featx.render.svg import svg

SVG_NS = "{http://www.w3.org/2000/svg}"
# what Debian's chromium needs headless, as root, on a machine with a closed network
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def _needed(what: str) -> None:
    if os.environ.get("FEATX_REQUIRE_BROWSER"):
        pytest.fail(f"{what} is required (FEATX_REQUIRE_BROWSER is set) but was not found")
    pytest.skip(f"{what} not found")


@pytest.fixture(scope="module")
def chromium() -> str:
    found = os.environ.get("FEATX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        _needed("chromium")
    return found


def browse(chromium: str, tmp_path: Path, url: str, *args: str) -> str:
    result = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args, url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def page_result(dom: str) -> dict:
    """What the page's script wrote into ``<pre id="out">``."""
    found = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture(scope="module")
def fc_report() -> featx.Report:
    torch.manual_seed(0)
    return featx.verify(torchvision.models.resnet18(), "fc", torch.randn(2, 3, 64, 64))


def test_svg_is_self_contained_and_holds_every_label_as_text(fc_report):
    doc = svg(fc_report)
    root = ET.fromstring(doc.encode())
    assert root.tag == f"{SVG_NS}svg" and int(root.get("width")) > 0 and int(root.get("height")) > 0
    # nothing to fetch and nothing to run
    assert not any(
        el.tag in (f"{SVG_NS}script", f"{SVG_NS}image", f"{SVG_NS}foreignObject") for el in root.iter()
    )
    assert not any(k.endswith("href") for el in root.iter() for k in el.attrib)
    assert "url(" not in doc and "@import" not in doc
    texts = ["".join(el.itertext()) for el in root.iter(f"{SVG_NS}text")]
    assert "✂ cut at fc: keeps 10 of 10 children" in texts
    (glue,) = [t for t in texts if t.startswith("glue flatten")]
    assert re.fullmatch(r"glue flatten · lost · torchvision/models/resnet\.py:\d+ \(eval, train\)", glue)
    assert "8  avgpool AdaptiveAvgPool2d" not in texts and "8  avgpoolAdaptiveAvgPool2d" in texts  # tspans
    assert "2 residuals (1 projection)" in texts  # layer2 of a ResNet-18
    assert "NOT faithful" in texts


def test_svg_renders_in_chromium_with_the_cut_and_each_lost_glue_op_visible(chromium, fc_report, tmp_path):
    page = tmp_path / "page.html"
    picture = svg(fc_report).split("\n", 1)[1]  # inline: without the XML declaration
    page.write_text(
        '<!doctype html><html><head><meta charset="utf-8"></head><body style="margin:0">'
        + picture
        + """<pre id="out">pending</pre><script>
const svg = document.querySelector("svg"), box = svg.getBoundingClientRect();
const visible = [], outside = [];
for (const t of svg.querySelectorAll("text")) {
  const r = t.getBoundingClientRect(), style = getComputedStyle(t);
  const shown = r.width > 0 && r.height > 0 && style.visibility === "visible" && style.display !== "none"
    && parseFloat(style.opacity) > 0 && style.fill !== "none";
  const inside = r.left >= box.left - 0.5 && r.right <= box.right + 0.5 && r.top >= box.top - 0.5
    && r.bottom <= box.bottom + 0.5;
  if (shown && inside) visible.push(t.textContent); else outside.push(t.textContent);
}
document.getElementById("out").textContent = JSON.stringify({visible, outside, width: box.width});
</script></body></html>""",
        encoding="utf-8",
    )
    seen = page_result(browse(chromium, tmp_path, page.as_uri(), "--dump-dom", "--window-size=1000,1400"))
    assert seen["width"] == 780
    assert seen["outside"] == []  # every label is drawn inside the picture
    visible = seen["visible"]
    assert "✂ cut at fc: keeps 10 of 10 children" in visible
    lost = [g for g in fc_report.anatomy.glue if g.status(fc_report.kept) == "lost"]
    assert [g.op for g in lost] == ["flatten"]
    for g in lost:
        assert any(t.startswith(f"glue {g.op} · lost · {g.source}") for t in visible)


def test_the_svg_file_renders_on_its_own_in_chromium(chromium, tmp_path, capsys):
    out = tmp_path / "cut.svg"
    code = main(
        [
            "verify",
            "torchvision/resnet18",
            "--upto",
            "layer2",
            "--input-shape",
            "2,3,64,64",
            "--svg",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    height = int(ET.parse(out).getroot().get("height"))
    png = tmp_path / "cut.png"
    browse(chromium, tmp_path, out.as_uri(), f"--screenshot={png}", f"--window-size=780,{height}")
    with Image.open(png) as image:
        pixels = torch.from_numpy(numpy.array(image.convert("RGB"))).int()

    def count(rgb: tuple[int, int, int]) -> int:
        return int(((pixels - torch.tensor(rgb)).abs().max(dim=-1).values <= 12).sum())

    assert tuple(pixels.shape) == (height, 780, 3)
    assert count((0xE8, 0xF5, 0xE9)) > 20_000  # the six kept children's green boxes
    assert count((0xF5, 0xF5, 0xF5)) > 10_000  # the four dropped children's grey boxes
    assert count((0xC6, 0x28, 0x28)) > 700  # the red dashed cut line and its label


def test_verify_config_draws_the_configs_outputs_on_the_picture(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "torchvision/resnet18",
                "upto": "layer3",
                "outputs": {"C3": "layer2", "C4": "layer3"},
                "verify": {"input_shape": [2, 3, 64, 64]},
            }
        )
    )
    out = tmp_path / "cut.svg"
    assert main(["verify", str(config), "--svg", str(out)]) == 0, capsys.readouterr().err
    texts = ["".join(el.itertext()) for el in ET.parse(out).getroot().iter(f"{SVG_NS}text")]
    assert (
        "2 residuals (1 projection) · output C3" in texts
        and "2 residuals (1 projection) · output C4" in texts
    )
    assert "✂ cut at layer3: keeps 7 of 10 children" in texts


def test_svg_flag_to_a_missing_folder_fails_before_the_run(tmp_path, capsys):
    out = tmp_path / "nowhere" / "cut.svg"
    code = main(["verify", "torchvision/resnet18", "--upto", "layer2", "--svg", str(out)])
    assert code == 2 and not out.parent.exists()
    assert capsys.readouterr().err == f"featx: error: --svg {out}: folder `{out.parent}` does not exist\n"


@pytest.fixture(scope="module")
def mermaid_js() -> Path:
    found = os.environ.get("FEATX_MERMAID_JS")
    if not found or not Path(found).is_file():
        _needed("mermaid.min.js (FEATX_MERMAID_JS)")
    return Path(found)


def test_markdown_mermaid_diagrams_render_with_mermaid(chromium, mermaid_js, tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    small = {"verify": {"input_shape": [2, 3, 64, 64]}}
    # output names are free text in a config: these must neither break nor inject into the diagram
    hostile = {'C4 "x" <b>y</b> `z`': "layer3", "end;%% click c0 call alert()\nC5 ::: #35; \\": "layer4"}
    for name, upto, outputs in (("good", "layer4", hostile), ("fc", "fc", ["fc"])):
        (folder / f"{name}.yaml").write_text(
            yaml.safe_dump({"model": "torchvision/resnet18", "upto": upto, "outputs": outputs, **small})
        )
    markdown = render_markdown(featx.check([folder]))
    blocks = re.findall(r"```mermaid\n(.*?)```", markdown, re.S)
    assert len(blocks) == 2
    page = tmp_path / "mermaid.html"
    page.write_text(
        f'<!doctype html><html><head><meta charset="utf-8"><script src="{mermaid_js.resolve().as_uri()}">'
        '</script></head><body><pre id="out">pending</pre><div id="drawn"></div><script>'
        f"const blocks = {json.dumps(blocks)};"
        """
mermaid.initialize({startOnLoad: false});
(async () => {
  const results = [];
  for (let i = 0; i < blocks.length; i++) {
    try {
      const {svg} = await mermaid.render("diagram" + i, blocks[i]);
      const div = document.createElement("div");
      div.innerHTML = svg;
      document.getElementById("drawn").appendChild(div);
      results.push({ok: true, text: div.textContent, nodes: div.querySelectorAll(".node").length});
    } catch (err) {
      results.push({ok: false, error: String(err)});
    }
  }
  document.getElementById("out").textContent = JSON.stringify(results);
})();
</script></body></html>""",
        encoding="utf-8",
    )
    dom = browse(
        chromium,
        tmp_path,
        page.as_uri(),
        "--dump-dom",
        "--allow-file-access-from-files",
        "--virtual-time-budget=30000",
    )
    fc, good = page_result(dom)  # the failing config comes first in name order
    assert fc["ok"], fc.get("error")
    assert good["ok"], good.get("error")
    # input, 10 children, the flatten glue and the output
    assert fc["nodes"] == good["nodes"] == 13
    assert "✂ cut: keeps 10 of 10" in fc["text"] and "glue flatten · lost" in fc["text"]
    assert "✂ cut: keeps 8 of 10" in good["text"] and "glue flatten · dropped" in good["text"]
    assert (
        "output C4 \"x\" <b>y</b> 'z'" in good["text"]
        and "output end;%% click c0 call alert() C5 ::: #35; \\" in good["text"]
    )


def test_the_table_and_the_pictures_show_one_chain_with_the_same_counts_and_verdict(fc_report):
    """The verify table, the Mermaid chart and the SVG walk the children and the root's glue in one order,
    count the same residuals and say the same verdict."""
    text = str(fc_report)
    table = []
    for line in text.splitlines():
        if glue := re.match(r"\s+↳ (\S+)", line):
            table.append(("glue", glue.group(1)))
        elif child := re.match(r"(\d+)\s+(\S+)\s+\S+\s+\S+\s+\S+\s+(\d+|-)", line):
            table.append((child.group(2), child.group(3).replace("-", "0")))
    chart = []
    for line in mermaid(fc_report).splitlines():
        if glue := re.match(r'\s+g\d+\{\{"glue (\S+) · ', line):
            chart.append(("glue", glue.group(1)))
        elif child := re.match(r'\s+c\d+\["\d+ (\S+) · [^<]*<br/>(?:(\d+) residual|no residuals)', line):
            chart.append((child.group(1), child.group(2) or "0"))
    assert table == chart and ("glue", "flatten") in table and ("layer1", "2") in table
    drawn = [
        re.sub(r"^\d+\s+", "", t) for t in re.findall(r'font-weight="bold">([^<]+)</tspan>', svg(fc_report))
    ]
    assert drawn == [name for name, _ in table if name != "glue"]
    verdict = next(line for line in text.splitlines() if "the cut at `fc`" in line).partition(":")[0]
    assert verdict == "NOT faithful"
    assert f"({verdict})</title>" in svg(fc_report)
