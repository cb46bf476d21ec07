"""featx extract's inputs: the --data walk (symlinks, special files, pseudo filesystems) and content-aware resume.

The dataset, the seeded CNN and the reference run are in tests/extract_support.py. Tests that change images
work on a copy of the dataset (``shutil.copytree`` keeps every file's mtime) and, to stay fast, on a copy of the
reference run, whose done markers recorded the dataset's stamps.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import featx
from featx.cli import main
from featx.extraction.sources import Sample, open_source, signature
from tests.extract_support import CORRUPT, ROOT, cli, expected, keys_of, run

CHANGED = "cat/03.png"  # in the first shard (shards of 7 sorted keys)
linux = pytest.mark.skipif(sys.platform != "linux", reason="/proc, /sys, fifos and unix sockets as on Linux")


def copy(tree: Path, to: Path) -> Path:
    shutil.copytree(tree, to, symlinks=True)
    return to


def rewrite(image: Path) -> None:
    """New pixels under the same name, and a modification time one second later than before."""
    before = image.stat().st_mtime_ns
    pixels = np.random.default_rng(1).integers(0, 256, (33, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    os.utime(image, ns=(before + 10**9, before + 10**9))


def stats(out: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    return {n: ((out / n).stat().st_ino, (out / n).stat().st_mtime_ns) for n in names}


def test_a_symlink_loop_gives_each_image_once(data: Path, tmp_path: Path) -> None:
    root = copy(data, tmp_path / "data")
    (root / "cat" / "loop").symlink_to("..")
    dataset = open_source(root)
    assert [s.key for s in dataset.samples] == keys_of(data)
    assert dataset.classes == ("cat", "dog")


def test_a_symlinked_class_folder_outside_the_root_is_walked_once(data: Path, tmp_path: Path) -> None:
    outside = tmp_path / "curated" / "dog"
    outside.mkdir(parents=True)
    for key in keys_of(data)[12:]:  # the dog images, as symlinked files: a curated subset
        (outside / Path(key).name).symlink_to(data / key)
    root = tmp_path / "data"
    shutil.copytree(data / "cat", root / "cat")
    (root / "dog").symlink_to(outside)
    (root / "dog_again").symlink_to(outside)  # the same folder by another name: already walked
    dataset = open_source(root)
    assert [s.key for s in dataset.samples] == keys_of(data)
    assert dataset.classes == ("cat", "dog")
    assert [s.label for s in dataset.samples] == [0] * 12 + [1] * 13


@linux
def test_a_fifo_a_socket_and_a_broken_symlink_are_skipped(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy(data, tmp_path / "data")
    os.mkfifo(root / "cat" / "fifo.png")
    (root / "cat" / "broken.jpg").symlink_to(root / "cat" / "gone.jpg")
    monkeypatch.chdir(root / "dog")  # a short relative name: socket paths are limited to ~100 bytes
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("socket.png")
        assert [s.key for s in open_source(root).samples] == keys_of(data)


@linux
def test_a_listed_fifo_is_refused_by_the_reader_instead_of_blocking_it(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.png")
    raised: list[BaseException] = []
    sample = Sample("fifo.png", None, str(tmp_path / "fifo.png"))

    def read() -> None:
        try:
            sample.read()
        except OSError as err:
            raised.append(err)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "reading a fifo blocked"
    assert [str(e) for e in raised] == [f"`{tmp_path / 'fifo.png'}` is a fifo, not a regular file"]


@linux
@pytest.mark.parametrize(
    ("data_arg", "message"),
    [
        ("/dev/null", "--data `/dev/null` is a character device; "),
        ("/proc/self", "--data `/proc/self` is on /proc, which holds no data; "),
        ("/sys", "--data `/sys` is on /sys, which holds no data; "),
        ("{tmp}/notes.md", "--data `{tmp}/notes.md` is a file that is neither a .txt list of paths nor a .tar shard; "),
    ],
)  # fmt: skip
def test_data_that_is_not_a_folder_a_list_or_shards_is_one_line_exit_2_at_once(
    data_arg: str, message: str, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.md").write_text("mine")
    started = time.monotonic()
    code = main(cli(Path(data_arg.format(tmp=tmp_path)), tmp_path / "out", weights))
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err == (
        f"featx: error: {message.format(tmp=tmp_path)}"
        "give a folder of images, a .txt list of paths, or .tar shards\n"
    )
    assert not (tmp_path / "out").exists()


@linux
def test_a_symlink_into_proc_inside_data_is_one_line_exit_2_at_once(
    data: Path, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy(data, tmp_path / "data")
    (root / "dog" / "proc").symlink_to("/proc")
    started = time.monotonic()
    assert main(cli(root, tmp_path / "out", weights)) == 2
    assert time.monotonic() - started < 10
    assert capsys.readouterr().err == (
        f"featx: error: --data `{root}`: folder `dog/proc` leads to /proc, which holds no data; "
        "remove the link or give another folder\n"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists any folder")
def test_a_folder_that_cannot_be_listed_is_one_line_exit_2(
    data: Path, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy(data, tmp_path / "data")
    (root / "dog").chmod(0)
    try:
        assert main(cli(root, tmp_path / "out", weights)) == 2
    finally:
        (root / "dog").chmod(0o755)
    assert capsys.readouterr().err == (
        f"featx: error: --data `{root}`: folder `dog` cannot be listed: Permission denied; "
        "give this process read access to it\n"
    )


def test_each_shard_records_the_signature_of_its_samples(data: Path, reference: Path) -> None:
    manifest = json.loads((reference / "manifest.json").read_text())
    signatures = [signature(shard) for shard in open_source(data).shards(7)]
    assert [s["inputs"] for s in manifest["shards"]] == signatures
    markers = [json.loads((reference / f"shard-{i:05d}.done").read_text()) for i in range(4)]
    assert [m["inputs"] for m in markers] == signatures


def test_an_image_rewritten_in_place_after_a_finished_run_is_recomputed(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    root, out = copy(data, tmp_path / "data"), copy(reference, tmp_path / "out")
    rewrite(root / CHANGED)
    others = ["shard-00001.safetensors", "shard-00002.safetensors", "shard-00003.safetensors"]
    before = stats(out, others)
    result = run(root, out, weights)
    assert (result.computed, result.resumed, result.changed) == (1, 3, 1)
    assert "shards: 1 computed (1 with changed images), 3 already done" in str(result)
    assert result.to_dict()["shards"] == {
        "total": 4,
        "computed": 1,
        "resumed": 3,
        "repaired": 0,
        "changed": 1,
    }
    assert stats(out, others) == before
    features, ref, want = featx.open_features(out), featx.open_features(reference), expected(root, weights)
    assert features.keys == ref.keys
    assert torch.equal(features[CHANGED]["act"], want[CHANGED]["act"])
    assert not torch.equal(features[CHANGED]["act"], ref[CHANGED]["act"])
    for key in features.keys:
        if key != CHANGED:
            assert torch.equal(features[key]["act"], ref[key]["act"]), key
            assert torch.equal(features[key]["block"], ref[key]["block"]), key


def test_an_image_changed_between_a_kill_and_a_resume_is_recomputed(
    data: Path, weights: Path, tmp_path: Path
) -> None:
    root, out = copy(data, tmp_path / "data"), tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEATX_EXTRACT_EXIT_AFTER": "2"}
    killed = subprocess.run(
        [sys.executable, "-m", "featx", *cli(root, out, weights)], env=env, capture_output=True, text=True
    )
    assert killed.returncode == 17, killed.stderr  # the fault injection: died after its second shard
    rewrite(root / CHANGED)  # in shard 0, which the killed run finished
    before = stats(out, ["shard-00001.safetensors"])
    result = run(root, out, weights)
    assert (result.computed, result.resumed, result.changed) == (3, 1, 1)
    assert stats(out, ["shard-00001.safetensors"]) == before
    features, want = featx.open_features(out), expected(root, weights)
    assert features.keys == sorted(want)
    for key, outputs in want.items():
        assert torch.equal(features[key]["act"], outputs["act"]), key
        assert torch.equal(features[key]["block"], outputs["block"]), key


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_image_made_unreadable_is_a_failed_sample_on_the_rerun(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    root, out = copy(data, tmp_path / "data"), copy(reference, tmp_path / "out")
    (root / CHANGED).chmod(0)
    result = run(root, out, weights)
    assert (result.computed, result.resumed, result.changed) == (1, 3, 1)
    assert [f["key"] for f in result.failed] == [CHANGED, CORRUPT]
    assert result.failed[0]["reason"].startswith("cannot decode: PermissionError")
    features = featx.open_features(out)
    assert CHANGED not in features and len(features) == 23


def test_a_relabelled_sample_of_a_list_is_recomputed(data: Path, weights: Path, tmp_path: Path) -> None:
    good = [k for k in keys_of(data) if k != CORRUPT]
    listing = tmp_path / "good.txt"
    listing.write_text("".join(f"{data / k}\t{int(k.startswith('dog'))}\n" for k in good))
    run(listing, tmp_path / "out", weights)
    listing.write_text(listing.read_text().replace(f"{data / CHANGED}\t0", f"{data / CHANGED}\t1"))
    result = run(listing, tmp_path / "out", weights)
    assert (result.computed, result.resumed, result.changed) == (1, 3, 1)
    features = featx.open_features(tmp_path / "out")
    assert features.labels == [1 if k.startswith("dog") or k == CHANGED else 0 for k in good]


def test_a_done_marker_without_inputs_is_not_done(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    out = copy(reference, tmp_path / "out")
    marker = out / "shard-00002.done"
    older = json.loads(marker.read_text())
    del older["inputs"]  # as a store written before featx recorded them
    marker.write_text(json.dumps(older))
    result = run(data, out, weights)
    assert (result.computed, result.resumed, result.changed) == (1, 3, 0)
    assert "inputs" in json.loads(marker.read_text())


@linux
def test_a_file_name_that_is_not_utf8_is_a_sample_and_its_key_reads_back(
    data: Path, weights: Path, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    (root / "cat").mkdir(parents=True)
    shutil.copy(data / "cat" / "00.jpg", root / "cat" / "00.jpg")
    odd = os.fsdecode(b"bad\xff.jpg")  # bytes no encoding names: Python keeps them as surrogates
    shutil.copy(data / "cat" / "01.png", root / "cat" / odd)
    result = run(root, tmp_path / "out", weights)
    assert (result.rows, result.failed) == (2, [])
    features = featx.open_features(tmp_path / "out")
    assert features.keys == ["cat/00.jpg", f"cat/{odd}"]
    assert features[f"cat/{odd}"]["block"].shape == (16,)


def test_a_symlink_to_a_sibling_class_neither_renames_nor_relabels_it(data: Path, tmp_path: Path) -> None:
    root = copy(data, tmp_path / "data")
    (root / "animals").symlink_to("dog")  # sorts before `cat` and `dog`
    (root / "cat" / "dogs").symlink_to("../dog")
    dataset = open_source(root)
    assert [s.key for s in dataset.samples] == keys_of(data)
    assert dataset.classes == ("cat", "dog")
    assert {s.key.split("/")[0]: s.label for s in dataset.samples} == {"cat": 0, "dog": 1}
