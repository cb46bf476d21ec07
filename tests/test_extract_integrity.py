"""featx extract integrity: every shard file carries its sha256 and size, open_features verifies before it
serves a row, a rerun recomputes exactly the shards that fail, ``featx extract --verify`` checks a store,
and a SIGKILL at any write leaves nothing a rerun trusts wrongly.

Each damage is done to a copy of a finished run (the ``reference`` fixture, and an npy one here); the
reference has 4 shards (7, 7, 7 and 3 rows + the corrupt image: 24 rows).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import featx
from featx.cli import main
from featx.extraction import check_store, writer
from tests.extract_support import ROOT, cli, run

RERUN = "rerun the same featx extract to recompute it"


@pytest.fixture(scope="module")
def reference_npy(data: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference_npy") / "features"
    run(data, out, weights, format="npy")
    return out


def copy(store: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(store, out)
    return out


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def tensor_offset(path: Path, name: str) -> int:
    """Where tensor ``name``'s bytes start in a safetensors file."""
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8 : 8 + n])
    return 8 + n + header[name]["data_offsets"][0]


def contents(store: Path) -> dict[str, bytes]:
    """Every file of a store but the done markers (they carry the run's id and timings), by relative path."""
    return {
        p.relative_to(store).as_posix(): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.suffix != ".done"
    }


def assert_bit_equal(out: Path, reference: Path) -> None:
    assert contents(out) == contents(reference)
    assert sorted(p.name for p in out.glob("*.done")) == sorted(p.name for p in reference.glob("*.done"))


def counts(result: featx.ExtractResult) -> tuple[int, int, int]:
    return result.computed, result.resumed, result.repaired


def read_all(out: Path) -> None:
    features = featx.open_features(out)
    for i in range(len(features)):
        features.row(i)


# --- damage to a shard: named when read, recomputed by a rerun -------------------------------------------------


def test_a_flipped_byte_in_a_safetensors_shard_is_named_on_reading_and_recomputed_by_a_rerun(
    data: Path, weights: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy(reference, tmp_path)
    flip(out / "shard-00001.safetensors", tensor_offset(out / "shard-00001.safetensors", "block") + 5)
    features = featx.open_features(out)
    assert features.row(0)["block"].shape == (16,)  # shard 0 is intact: served
    message = f"`{out}`: shard-00001.safetensors: content differs from the manifest's sha256; {RERUN}"
    with pytest.raises(featx.FeatxError) as caught:
        features.row(7)
    assert str(caught.value) == message
    with pytest.raises(featx.FeatxError, match=re.escape("shard-00001.safetensors: content differs")):
        features.tensor("block")
    assert main(cli(data, out, weights)) == 1  # the corrupt image: finished with a failed sample
    assert "shards: 1 computed (1 failed verification), 3 already done" in capsys.readouterr().out
    assert_bit_equal(out, reference)
    read_all(out)


def test_a_flipped_byte_in_an_npy_output_file_is_named_and_recomputed(
    data: Path, weights: Path, reference_npy: Path, tmp_path: Path
) -> None:
    out = copy(reference_npy, tmp_path)
    flip(out / "act" / "act-00002.npy", 200)
    features = featx.open_features(out)
    with pytest.raises(
        featx.FeatxError,
        match=re.escape(f"act/act-00002.npy: content differs from the manifest's sha256; {RERUN}"),
    ):
        features.numpy("block")
    assert counts(run(data, out, weights, format="npy")) == (1, 3, 1)
    assert_bit_equal(out, reference_npy)


def test_a_flipped_byte_in_the_npy_metadata_table_is_named_and_recomputed(
    data: Path, weights: Path, reference_npy: Path, tmp_path: Path
) -> None:
    out = copy(reference_npy, tmp_path)
    flip(out / "metadata" / "metadata-00000.npy", 150)
    with pytest.raises(featx.FeatxError, match=re.escape("metadata/metadata-00000.npy: content differs")):
        featx.open_features(out)["cat/00.jpg"]
    assert counts(run(data, out, weights, format="npy")) == (1, 3, 1)
    assert_bit_equal(out, reference_npy)


def test_a_flipped_byte_in_sample_index_is_named_and_recomputed(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    out = copy(reference, tmp_path)
    flip(out / "shard-00002.safetensors", tensor_offset(out / "shard-00002.safetensors", "sample_index"))
    with pytest.raises(featx.FeatxError, match=re.escape("shard-00002.safetensors: content differs")):
        featx.open_features(out).row(14)
    assert counts(run(data, out, weights)) == (1, 3, 1)
    assert_bit_equal(out, reference)


def test_a_truncated_shard_is_named_with_its_size_and_recomputed(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    out = copy(reference, tmp_path)
    shard = out / "shard-00002.safetensors"
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    with pytest.raises(featx.FeatxError) as caught:
        featx.open_features(out).row(20)
    assert str(caught.value) == (
        f"`{out}`: shard-00002.safetensors: size {size // 2}, expected {size}: truncated; {RERUN}"
    )
    assert counts(run(data, out, weights)) == (1, 3, 1)
    assert_bit_equal(out, reference)


def test_two_swapped_shard_files_are_both_recomputed(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    out = copy(reference, tmp_path)
    a, b = out / "shard-00000.safetensors", out / "shard-00001.safetensors"
    assert a.stat().st_size == b.stat().st_size  # 7 rows each: only the content tells them apart
    a.rename(tmp_path / "a")
    b.rename(a)
    (tmp_path / "a").rename(b)
    with pytest.raises(featx.FeatxError, match=re.escape("shard-00000.safetensors: content differs")):
        featx.open_features(out)["cat/00.jpg"]
    assert counts(run(data, out, weights)) == (2, 2, 2)
    assert_bit_equal(out, reference)


def test_a_deleted_shard_file_is_named_missing_and_recomputed(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    out = copy(reference, tmp_path)
    (out / "shard-00003.safetensors").unlink()
    with pytest.raises(featx.FeatxError) as caught:
        featx.open_features(out).row(-1)
    assert str(caught.value) == f"`{out}`: shard-00003.safetensors: missing; {RERUN}"
    assert counts(run(data, out, weights)) == (1, 3, 1)
    assert_bit_equal(out, reference)


def test_a_deleted_marker_makes_its_shard_recomputed_not_repaired(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    out = copy(reference, tmp_path)
    (out / "shard-00001.done").unlink()
    read_all(out)  # the files and the manifest are intact: served
    assert counts(run(data, out, weights)) == (1, 3, 0)
    assert_bit_equal(out, reference)


def test_a_marker_without_digests_is_not_trusted(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    out = copy(reference, tmp_path)
    marker = json.loads((out / "shard-00000.done").read_text())
    del marker["digests"]  # as featx wrote markers before it recorded digests
    (out / "shard-00000.done").write_text(json.dumps(marker))
    assert counts(run(data, out, weights)) == (1, 3, 1)
    assert "digests" in json.loads((out / "shard-00000.done").read_text())


def test_a_marker_whose_index_names_other_samples_is_not_trusted(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    out = copy(reference, tmp_path)
    marker = json.loads((out / "shard-00001.done").read_text())
    marker["index"] = marker["index"][::-1]  # keys and files untouched: only the index disagrees
    (out / "shard-00001.done").write_text(json.dumps(marker))
    assert counts(run(data, out, weights)) == (1, 3, 1)
    assert_bit_equal(out, reference)


# --- the manifest -----------------------------------------------------------------------------------------------


def test_a_corrupt_manifest_is_refused_and_a_rerun_rewrites_it_computing_nothing(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    out = copy(reference, tmp_path)
    (out / "manifest.json").write_bytes((out / "manifest.json").read_bytes()[:-40])
    with pytest.raises(
        featx.FeatxError, match=r"manifest.json` cannot be read \(.*\); rerun the same featx extract"
    ):
        featx.open_features(out)
    assert counts(run(data, out, weights)) == (0, 4, 0)
    assert_bit_equal(out, reference)


def test_an_edited_manifest_is_refused_by_its_own_digest_and_rewritten_by_a_rerun(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    out = copy(reference, tmp_path)
    text = (out / "manifest.json").read_text()
    assert text.count('"cat/03.png"') == 1
    (out / "manifest.json").write_text(text.replace('"cat/03.png"', '"cat/03.jpg"'))  # still valid JSON
    with pytest.raises(featx.FeatxError) as caught:
        featx.open_features(out)
    assert str(caught.value) == (
        f"`{out}/manifest.json`: content differs from its own sha256 (edited or damaged); "
        "rerun the same featx extract to rewrite it"
    )
    unchecked = featx.open_features(out, verify=False)  # no check, as documented
    assert len(unchecked) == 24
    with pytest.raises(featx.FeatxError, match="content differs from its own sha256"):
        unchecked.verify()  # an explicit verify() checks the manifest too
    assert counts(run(data, out, weights)) == (0, 4, 0)
    assert_bit_equal(out, reference)


def test_a_manifest_whose_shard_entries_disagree_is_refused_even_with_a_matching_digest(
    reference: Path, tmp_path: Path
) -> None:
    out = copy(reference, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][1]["keys"][0] = manifest["shards"][0]["keys"][0]  # one key in two rows
    manifest["digest"] = writer.content_digest(manifest)  # edited by someone who knew the digest
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(featx.FeatxError) as caught:
        featx.open_features(out)
    assert str(caught.value) == (
        f"`{out}/manifest.json`: key `cat/00.jpg` is in 2 rows; rerun the same featx extract to rewrite it"
    )


def test_a_run_with_shards_to_compute_removes_the_manifest_before_writing_one(
    data: Path, weights: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    out = copy(reference, tmp_path)
    (out / "shard-00002.done").unlink()

    def full(path: str, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_store", full)
    with pytest.raises(
        featx.FeatxError, match=re.escape("shard-00002.safetensors`: no space left on the device")
    ):
        run(data, out, weights)
    assert not (out / "manifest.json").exists()


def test_a_manifest_naming_another_fingerprint_than_fingerprint_json_is_refused(
    reference: Path, tmp_path: Path
) -> None:
    out = copy(reference, tmp_path)
    theirs = json.loads((out / "fingerprint.json").read_text())
    (out / "fingerprint.json").write_text(json.dumps({**theirs, "id": "0123456789abcdef"}))
    with pytest.raises(featx.FeatxError, match=re.escape("is not fingerprint.json's (`0123456789abcdef`)")):
        featx.open_features(out)


# --- reading: once per shard, verify=False, Features.verify() --------------------------------------------------


def test_each_shard_is_hashed_once_per_features_object(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []
    real = writer.sha256_of
    monkeypatch.setattr(writer, "sha256_of", lambda path: hashed.append(Path(path).name) or real(path))
    features = featx.open_features(reference)
    features.row(0), features.row(1), features["cat/02.jpg"]
    assert hashed == ["shard-00000.safetensors"]
    features.tensor("act")
    assert hashed == [f"shard-0000{i}.safetensors" for i in range(4)]
    features.tensor("block")
    assert len(hashed) == 4


def test_verify_false_skips_the_check_and_serves_what_the_file_holds(reference: Path, tmp_path: Path) -> None:
    out = copy(reference, tmp_path)
    flip(out / "shard-00000.safetensors", tensor_offset(out / "shard-00000.safetensors", "block") + 5)
    features = featx.open_features(out, verify=False)
    assert not featx.open_features(reference).row(0)["block"].equal(features.row(0)["block"])


def test_features_verify_checks_every_shard_and_reports_leftover_temporaries(
    reference: Path, tmp_path: Path
) -> None:
    out = copy(reference, tmp_path)
    (out / ".shard-00004.safetensors.k2j3h").write_bytes(b"half")
    check = featx.open_features(out).verify()
    assert (check.shards, check.rows, check.intact) == (4, 24, True)
    assert check.temporaries == [".shard-00004.safetensors.k2j3h"]
    assert (
        check.lines()[0]
        == ".shard-00004.safetensors.k2j3h: a temporary file of an interrupted write; a rerun removes it"
    )
    os.truncate(out / "shard-00001.safetensors", 10)
    flip(out / "shard-00003.safetensors", 100)
    with pytest.raises(featx.FeatxError) as caught:
        featx.open_features(out).verify()
    size = (reference / "shard-00001.safetensors").stat().st_size
    assert str(caught.value) == (
        f"`{out}`: shard-00001.safetensors: size 10, expected {size}: truncated (2 shards damaged); {RERUN}"
    )


# --- featx extract --verify DIR ---------------------------------------------------------------------------------


def test_verify_an_intact_store_exits_0_with_one_summary_line(
    reference: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["extract", "--verify", str(reference)]) == 0
    assert capsys.readouterr().out == f"{reference}: 4 shards, 24 rows checked (sha256), intact\n"


def test_verify_a_damaged_store_exits_1_with_one_line_per_damaged_shard(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy(reference, tmp_path)
    (out / "shard-00000.safetensors").unlink()
    flip(out / "shard-00002.safetensors", 100)
    assert main(["extract", "--verify", str(out)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "shard-00000.safetensors: missing",
        "shard-00002.safetensors: content differs from the manifest's sha256",
        f"{out}: 4 shards, 24 rows checked (sha256), 2 damaged: shard-00000.safetensors: missing; {RERUN}",
    ]
    assert main(["extract", "--verify", str(out), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["intact"], report["exit_code"], len(report["problems"])) == (False, 1, 2)


def test_verify_a_damaged_manifest_exits_1(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy(reference, tmp_path)
    (out / "manifest.json").write_text("{")
    assert main(["extract", "--verify", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("manifest.json: cannot be read (")
    assert lines[1].endswith("; rerun the same featx extract to rewrite it")


def test_verify_an_unfinished_store_exits_3_and_not_a_store_exits_2(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy(reference, tmp_path)
    (out / "manifest.json").unlink()
    assert main(["extract", "--verify", str(out)]) == 3
    assert capsys.readouterr().out == (
        f"{out}: not finished (no manifest.json); rerun the same featx extract to resume it\n"
    )
    assert main(["extract", "--verify", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"featx: error: `{tmp_path}` is not a featx extraction folder (no manifest.json)\n"
    )
    killed = tmp_path / "killed"  # a run killed while it wrote its fingerprint: featx's, not finished
    killed.mkdir()
    (killed / ".fingerprint.json.k3x9q2").write_text("{")
    assert main(["extract", "--verify", str(killed)]) == 3
    assert capsys.readouterr().out.endswith(
        f"{killed}: not finished (no manifest.json); rerun the same featx extract to resume it\n"
    )


def test_verify_takes_no_spec_and_extract_without_it_needs_one(
    reference: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["extract", "some/spec", "--verify", str(reference)]) == 2
    assert capsys.readouterr().err == "featx: error: --verify checks a store on its own; drop SPEC|CONFIG\n"
    assert main(["extract", "--out", str(reference)]) == 2
    assert capsys.readouterr().err == (
        "featx: error: featx extract needs SPEC|CONFIG, --data (or --verify DIR to check a store)\n"
    )


# --- SIGKILL at every write point -------------------------------------------------------------------------------

# point -> (the temporary file the kill leaves, shards the rerun computes, shards it finds done)
KILLS = {
    "fingerprint": (".fingerprint.json.", 4, 0),
    "shard": (".shard-00000.safetensors.", 4, 0),
    "shard:2": (".shard-00001.safetensors.", 3, 1),
    "marker": (".shard-00000.done.", 4, 0),
    "marker:2": (".shard-00001.done.", 3, 1),
    "manifest": (".manifest.json.", 0, 4),
}


@pytest.mark.parametrize(
    "point",
    list(KILLS),
)
def test_a_kill_at_any_write_then_the_same_command_gives_the_uninterrupted_store(
    point: str, data: Path, weights: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    # the killed run's threads are this process's (OMP_NUM_THREADS sets torch's): the store records them
    threads = str(torch.get_num_threads())
    env = {**os.environ, "PYTHONPATH": str(ROOT), writer.FAULT_ENV: point, "OMP_NUM_THREADS": threads}
    killed = subprocess.run(
        [sys.executable, "-m", "featx", *cli(data, out, weights)], env=env, capture_output=True, text=True
    )
    assert killed.returncode == 17, killed.stderr
    left, computed, resumed = KILLS[point]
    assert [p.name for p in out.glob(".*") if p.name.startswith(left)] != []  # as a SIGKILL leaves it
    markers = sorted(out.glob("shard-*.done"))
    assert len(markers) == resumed
    files = [*markers, *(m.with_suffix(".safetensors") for m in markers)]  # a finished shard: marker and data
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    assert main(cli(data, out, weights)) == 1  # the corrupt image
    assert f"shards: {computed} computed, {resumed} already done\n" in capsys.readouterr().out
    assert {p: ((out / p).stat().st_ino, (out / p).stat().st_mtime_ns) for p in finished} == finished
    assert_bit_equal(out, reference)
    assert not [p for p in out.rglob(".*")]


def test_a_fault_point_that_does_not_exist_is_refused(
    data: Path, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(writer.FAULT_ENV, "shards:2")
    with pytest.raises(featx.FeatxError) as caught:
        run(data, tmp_path / "out", weights)
    assert str(caught.value) == (
        "FEATX_EXTRACT_FAULT=`shards:2` is not accepted; give <point>[:<k>], point one of "
        "`fingerprint`, `shard`, `marker`, `manifest`"
    )


# --- a done marker is checked against its own digest -----------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "edit"),
    [
        ("labels", lambda marker: {**marker, "labels": [1 - marker["labels"][0], *marker["labels"][1:]]}),
        ("rows", lambda marker: {**marker, "rows": marker["rows"] - 1}),
        ("failed", lambda marker: {**marker, "failed": [{"key": marker["keys"][0], "reason": "edited"}]}),
    ],
)
def test_an_edited_done_marker_is_recomputed_not_sealed_into_the_manifest(
    field: str, edit, data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    out = copy(reference, tmp_path)
    marker = out / "shard-00001.done"
    marker.write_text(json.dumps(edit(json.loads(marker.read_text()))))  # one value changed, digest kept
    result = run(data, out, weights)
    assert counts(result) == (1, 3, 1), field
    assert (
        json.loads(marker.read_text())["repaired"]
        == "shard-00001.done differs from its own sha256 (edited or damaged)"
    )
    assert_bit_equal(out, reference)
    assert featx.open_features(out).labels == featx.open_features(reference).labels
    assert check_store(out).exit_code == 0


def test_a_shard_whose_every_image_failed_reads_in_bulk_with_the_others(
    data: Path, weights: Path, tmp_path: Path
) -> None:
    # shards of 12: cat/*, dog/00-11, and dog/corrupt.jpg alone, whose shard has no row
    for fmt in ("safetensors", "npy"):
        out = tmp_path / fmt
        result = run(data, out, weights, shard_size=12, format=fmt)
        assert (result.shards, result.rows, len(result.failed)) == (3, 24, 1)
        features = featx.open_features(out)
        assert features.tensor("act").shape == (24, 8, 16, 16)
        assert features.numpy("block").shape == (24, 16)
