"""featx extract: features equal to the built backbone's, every sample exactly once, resumable, torchrun ranks.

The dataset, the seeded CNN and the reference run are in tests/extract_support.py; the torchrun tests run real
``torchrun --nproc-per-node 2`` on CPU (gloo).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import featx
from featx.cli import main
from tests.extract_support import (  # its fixtures (data, weights, reference) come through conftest.py
    CLASSES,
    CORRUPT,
    MEAN,
    PER_CLASS,
    ROOT,
    SPEC,
    STD,
    assert_same_features,
    cli,
    expected,
    keys_of,
    run,
    set_flag,
)


def test_features_are_bit_equal_to_the_built_backbone_on_the_same_preprocessed_tensors(
    data: Path, weights: Path, reference: Path
) -> None:
    features = featx.open_features(reference)
    want = expected(data, weights)
    assert features.keys == sorted(want) == [k for k in keys_of(data) if k != CORRUPT]
    for key, outputs in want.items():
        got = features[key]
        assert set(got) == {"act", "block"}
        assert torch.equal(got["act"], outputs["act"]), key
        assert torch.equal(got["block"], outputs["block"]), key
    assert features.tensor("act").shape == (2 * PER_CLASS, 8, 16, 16)
    assert features.tensor("block").shape == (2 * PER_CLASS, 16)
    assert features.labels == [0] * PER_CLASS + [1] * PER_CLASS
    assert features.classes == list(CLASSES)


def test_a_config_extracts_its_taps_with_its_data_section(data: Path, weights: Path, tmp_path: Path) -> None:
    config = {
        "model": SPEC, "weights": str(weights), "upto": "block", "outputs": {"C1": "act", "C2": "block"},
        "norm": "frozen", "data": {"input_size": 24, "interpolation": "bicubic", "crop_pct": 1.0},
    }  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    result = featx.extract(
        str(path),
        data,
        tmp_path / "out",
        pool={"C2": "avg"},
        batch_size=4,
        shard_size=7,
        workers=0,
        progress=False,
    )
    assert str(result.preprocessing) == (
        "ImageNet default, changed by the config's data section: resize 24 bicubic, center crop 24x24, "
        "mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)"
    )
    assert result.outputs["C1"]["shape"] == [8, 12, 12] and result.outputs["C2"]["shape"] == [16]
    features = featx.open_features(tmp_path / "out")
    settings = {"input_size": (3, 24, 24), "interpolation": "bicubic", "crop_pct": 1.0}
    want = expected(data, weights, config, settings, pooled="C2")
    assert features.keys == sorted(want)
    for key, outputs in want.items():
        assert torch.equal(features[key]["C1"], outputs["C1"]), key
        assert torch.equal(features[key]["C2"], outputs["C2"]), key


def test_corrupt_image_is_listed_with_its_reason_and_every_sample_is_once(
    reference: Path, data: Path
) -> None:
    manifest = json.loads((reference / "manifest.json").read_text())
    assert [f["key"] for f in manifest["failed"]] == [CORRUPT]
    assert manifest["failed"][0]["reason"].startswith("cannot decode: UnidentifiedImageError")
    rows = [k for s in manifest["shards"] for k in s["keys"]]
    assert sorted([*rows, CORRUPT]) == keys_of(data) and len(set(rows)) == len(rows)
    assert manifest["samples"] == 2 * PER_CLASS + 1 and manifest["rows"] == 2 * PER_CLASS
    assert [s["rows"] for s in manifest["shards"]] == [
        7,
        7,
        7,
        3,
    ]  # the corrupt file sorts last: in the fourth shard
    assert manifest["fingerprint"]["weights"]["sha256"]  # the weights file's hash is in the fingerprint
    with_index = load_file(reference / manifest["shards"][1]["file"])
    assert with_index["sample_index"].tolist() == list(range(7, 14))
    assert manifest["outputs"]["block"] == {
        "child": "block",
        "pool": "avg",
        "dtype": "float32",
        "shape": [16],
    }


def test_cli_exits_1_with_failed_samples_and_shows_the_time_split(
    data: Path, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(set_flag(cli(data, tmp_path / "out", weights), "--workers", "2"))
    text = capsys.readouterr().out
    assert code == 1
    assert "preprocessing  ImageNet default: resize 36 bilinear, center crop 32x32" in text
    assert "verified       faithful in eval mode on the first 4 images, at `act`, `block`" in text
    assert "samples 25: 24 extracted, 1 failed; shards: 4 computed, 0 already done" in text
    assert " decode " in text and " transform " in text and " model " in text and " write " in text
    assert f"  {CORRUPT}  cannot decode" in text
    assert_same_features(tmp_path / "out", tmp_path / "out")  # readable
    assert main([*cli(data, tmp_path / "out", weights), "--json"]) == 1  # rerun: everything resumed
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == {"total": 4, "computed": 0, "resumed": 4, "repaired": 0, "changed": 0}
    assert summary["failed"][0]["key"] == CORRUPT and summary["exit_code"] == 1


def test_all_good_images_exit_0(data: Path, weights: Path, tmp_path: Path) -> None:
    listing = tmp_path / "good.txt"
    listing.write_text("".join(f"{data / k}\t{k.startswith('dog')}\n".replace("True", "1").replace("False", "0")
                               for k in keys_of(data) if k != CORRUPT))  # fmt: skip
    result = run(listing, tmp_path / "out", weights)
    assert result.exit_code == 0 and result.rows == 2 * PER_CLASS and not result.failed
    features = featx.open_features(tmp_path / "out")
    assert features.labels == [0] * PER_CLASS + [1] * PER_CLASS


def test_killed_run_resumes_without_loss_duplicates_or_recomputing_finished_shards(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEATX_EXTRACT_EXIT_AFTER": "2"}
    killed = subprocess.run(
        [sys.executable, "-m", "featx", *cli(data, out, weights)], env=env, capture_output=True, text=True
    )
    assert killed.returncode == 17, killed.stderr  # the fault injection: died after its second shard
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*.safetensors")}
    assert sorted(finished) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not (out / "manifest.json").exists()
    with pytest.raises(featx.FeatxError, match="has not finished; rerun the same featx extract"):
        featx.open_features(out)
    result = run(data, out, weights)
    assert (result.computed, result.resumed) == (2, 2)
    assert {p: (out / p).stat().st_ino for p in finished} == {p: v[0] for p, v in finished.items()}
    assert {p: (out / p).stat().st_mtime_ns for p in finished} == {p: v[1] for p, v in finished.items()}
    assert_same_features(out, reference)


def test_another_fingerprint_is_refused_and_overwrite_starts_over(
    data: Path, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    run(data, out, weights)
    assert main(set_flag(cli(data, out, weights), "--pool", "block=max")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(
        f"featx: error: --out `{out}` holds another extraction (its fingerprint differs in `pool.block`)"
    )
    assert "--overwrite" in err
    before = (out / "shard-00000.safetensors").read_bytes()
    result = run(data, out, weights, pool={"block": "max"}, overwrite=True)
    assert result.computed == 4 and (out / "shard-00000.safetensors").read_bytes() != before
    assert featx.open_features(out).outputs["block"]["pool"] == "max"


def test_npy_layout_is_readable_with_numpy_alone(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "npy"
    run(data, out, weights, format="npy")
    script = (
        "import sys; sys.modules['torch'] = None\n"  # any torch import would fail
        "import json, pathlib, numpy as np\n"
        f"out = pathlib.Path({str(out)!r})\n"
        "block = np.concatenate([np.load(p) for p in sorted((out / 'block').glob('*.npy'))])\n"
        "meta = np.concatenate([np.load(p) for p in sorted((out / 'metadata').glob('*.npy'))])\n"
        "np.save(out.parent / 'block.npy', block)\n"
        "print(json.dumps({'keys': meta['key'].tolist(), 'index': meta['sample_index'].tolist(),\n"
        "                  'labels': meta['label'].tolist(), 'shape': block.shape, 'dtype': str(block.dtype)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    table = json.loads(done.stdout)
    ref = featx.open_features(reference)
    assert table["keys"] == ref.keys
    assert table["labels"] == ref.labels
    assert table["index"] == [i for i in range(2 * PER_CLASS + 1) if keys_of(data)[i] != CORRUPT]
    assert table["shape"] == [2 * PER_CLASS, 16] and table["dtype"] == "float32"
    assert np.array_equal(np.load(tmp_path / "block.npy"), ref.numpy("block"))
    npy = featx.open_features(out)
    assert isinstance(npy.numpy("act"), np.ndarray)
    assert torch.equal(npy["cat/03.png"]["act"], ref["cat/03.png"]["act"])
    assert torch.equal(npy.row(-1)["block"], ref.row(-1)["block"])


def test_float16_and_bfloat16_storage(data: Path, weights: Path, reference: Path, tmp_path: Path) -> None:
    result = run(data, tmp_path / "out", weights, dtype={"act": "float16", "block": "bfloat16"})
    features = featx.open_features(result.out)
    ref = featx.open_features(reference)
    assert torch.equal(features.tensor("act"), ref.tensor("act").half())
    assert torch.equal(features.tensor("block"), ref.tensor("block").bfloat16())
    with pytest.raises(featx.FeatxError, match="bfloat16"):
        run(data, tmp_path / "npy", weights, dtype="bfloat16", format="npy")


def test_webdataset_tar_shards_give_the_folder_features(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    import webdataset as wds

    keys = keys_of(data)
    shards = [tmp_path / "shards" / f"part-{i}.tar" for i in range(2)]
    shards[0].parent.mkdir()
    for s, path in enumerate(shards):
        with wds.TarWriter(str(path)) as sink:
            for i, key in enumerate(keys[s::2]):
                ext = key.rsplit(".", 1)[1]
                sink.write({"__key__": f"s{i:03d}", ext: (data / key).read_bytes(), "cls": str(CLASSES.index(key.split("/")[0])), "txt": key})  # fmt: skip
    result = run(tmp_path / "shards", tmp_path / "out", weights, shard_size=5)
    features, ref = featx.open_features(tmp_path / "out"), featx.open_features(reference)
    names = {}
    for path in shards:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".txt"):
                    names[f"{path.name}/{member.name[:-4]}"] = tar.extractfile(member).read().decode()
    assert [f["key"] for f in result.failed] == [k for k, v in names.items() if v == CORRUPT]
    assert len(features) == 2 * PER_CLASS and features.keys == sorted(features.keys)
    for i, key in enumerate(features.keys):
        original = names[key]
        assert features.labels[i] == CLASSES.index(original.split("/")[0])
        # other batches than the folder run's, so equal up to float rounding, not bit for bit
        torch.testing.assert_close(features[key]["act"], ref[original]["act"], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("case", "args", "message"),
    [
        ("missing data", ["--data", "{tmp}/nope"], "--data `{tmp}/nope` does not exist"),
        ("empty data", ["--data", "{tmp}/empty"], "--data `{tmp}/empty` holds no image files"),
        ("empty data argument", ["--data", ""], "--data is empty"),
        ("out holds other files", ["--out", "{tmp}/other"], "--out `{tmp}/other` holds files that are not a featx extraction (`notes.txt`)"),
        ("tap not a child", ["--outputs", "act,blok"], "--outputs `blok` is not a child of `TinyNet` (did you mean `block`?)"),
        ("tap after the cut", ["--outputs", "head"], "--outputs `head` is after the cut at `block`"),
        ("pool of an unknown output", ["--pool", "blok=avg"], "--pool names `blok`, which is not an output"),
        ("cls pool of a feature map", ["--pool", "cls"], "--pool cls for output `act` takes the first token"),
        ("model failing on the first batch", ["--model-kwarg", "fail=true"], "the model fails on the first batch (4 images from `cat/00.jpg`)"),
        ("unfaithful cut", ["--model-kwarg", "glue=true"], "the cut is NOT faithful on the first 4 images: `block`: glue `add`"),
        ("out is a file", ["--out", "{tmp}/notes.txt"], "--out `{tmp}/notes.txt` is a file"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2_and_nothing_is_written(
    case: str, args: list[str], message: str, data: Path, weights: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine")
    argv = cli(data, tmp_path / "out", weights)
    for flag, value in zip(args[::2], args[1::2], strict=True):
        argv = set_flag(argv, flag, value.format(tmp=tmp_path))
    assert main(argv) == 2, case
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("featx: error: " + message.format(tmp=tmp_path)), err
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path / "other") == ["notes.txt"]


def test_unfaithful_cut_is_extracted_when_allowed(data: Path, weights: Path, tmp_path: Path) -> None:
    result = run(data, tmp_path / "out", weights, model_kwargs={"glue": True}, allow_unfaithful=True)
    assert result.verified.startswith("NOT faithful on the first 4 images at `act`, `block`")
    assert result.unfaithful and result.rows == 2 * PER_CLASS


@pytest.mark.parametrize("where", ["shard", "fingerprint"])
def test_full_disk_is_exit_3_unwritable_out_exit_2_and_nothing_is_left_a_resume_trusts(
    where: str, data: Path, weights: Path, reference: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    import errno

    from featx.extraction import writer

    out = tmp_path / "out"
    real, calls = writer._store, []  # every file featx extract writes goes through it

    def store(path: str, data: bytes) -> None:
        calls.append(Path(path).name)
        if where == "shard" and calls[-1].startswith(".shard-00001.safetensors."):
            Path(path).write_bytes(data[:4])  # the disk fills up while the second shard is written
            raise OSError(errno.ENOSPC, "No space left on device")
        if where == "fingerprint":  # the folder refuses the first file
            raise PermissionError(errno.EACCES, "Permission denied")
        real(path, data)

    monkeypatch.setattr(writer, "_store", store)
    message = {
        "shard": f"featx: error: --out: cannot write `{out}/shard-00001.safetensors`: no space left on the device",
        "fingerprint": f"featx: error: --out: cannot write `{out}/fingerprint.json`: Permission denied",
    }[where]
    # a full disk stops a run whose input was fine (3: did not finish); a refused folder is bad input (2)
    assert main(cli(data, out, weights)) == (3 if where == "shard" else 2)
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    monkeypatch.undo()
    trusted = sorted(p.name for p in out.glob("*.done")) if out.exists() else []
    assert trusted == (["shard-00000.done"] if where == "shard" else [])
    assert not [p for p in out.rglob(".*")] if out.exists() else True  # no temporary file left
    assert run(data, out, weights).computed == (3 if where == "shard" else 4)
    assert_same_features(out, reference)


def torchrun(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "featx", *argv]
    return subprocess.run(
        command,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.torchrun
def test_torchrun_two_ranks_equal_one_process_and_a_killed_rank_resumes(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    killed = torchrun(cli(data, out, weights), FEATX_EXTRACT_EXIT_AFTER="1")
    assert killed.returncode != 0
    assert not (out / "manifest.json").exists()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*.safetensors")}
    done = {p.name.replace(".done", ".safetensors") for p in out.glob("*.done")}
    assert 1 <= len(done) <= 3 and done <= set(finished)
    again = torchrun(cli(data, out, weights))
    assert again.returncode != 0  # exit 1 (the corrupt image) from the ranks; torchrun reports it
    assert "samples 25: 24 extracted, 1 failed" in again.stdout
    assert again.stdout.count("featx extract ") == 1  # rank 0 alone prints the summary
    for name in done:  # finished shards were not recomputed
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == finished[name]
    markers = [json.loads(p.read_text()) for p in sorted(out.glob("*.done"))]
    assert [m["rank"] for m in markers] == [0, 1, 0, 1]  # rank r takes shards r::2
    assert_same_features(out, reference)
    manifest = json.loads((out / "manifest.json").read_text())
    rows = [k for s in manifest["shards"] for k in s["keys"]]
    assert sorted([*rows, CORRUPT]) == keys_of(data)


@pytest.mark.skipif(
    "keep_glue" not in __import__("inspect").signature(featx.truncate).parameters,
    reason="featx.truncate(..., keep_glue=True) has not landed in this branch",
)
def test_keep_glue_extracts_what_the_full_model_computes_at_the_cut(
    data: Path, weights: Path, tmp_path: Path
) -> None:
    with pytest.raises(featx.FeatxError, match="NOT faithful"):  # the +1 before `block` is lost glue
        run(data, tmp_path / "lost", weights, model_kwargs={"glue": True}, outputs=None, pool="avg")
    result = run(
        data,
        tmp_path / "out",
        weights,
        model_kwargs={"glue": True},
        outputs=None,
        pool="none",
        keep_glue=True,
    )
    assert result.verified.startswith("faithful in eval mode")
    model = featx.load_model(SPEC, weights=str(weights), glue=True)
    seen = []
    model.block.register_forward_hook(lambda module, args, output: seen.append(output))
    want = expected(data, weights)
    from timm.data import create_transform

    transform = create_transform(
        input_size=(3, 32, 32), interpolation="bilinear", crop_pct=0.875, mean=MEAN, std=STD
    )
    features = featx.open_features(tmp_path / "out")
    assert features.keys == sorted(want)
    for s in range(0, len(keys_of(data)), 7):
        shard = keys_of(data)[s : s + 7]
        for b in range(0, len(shard), 4):
            batch = [k for k in shard[b : b + 4] if k != CORRUPT]
            seen.clear()
            with torch.no_grad():
                model(torch.stack([transform(Image.open(data / k).convert("RGB")) for k in batch]))
            for j, k in enumerate(batch):
                assert torch.equal(features[k]["block"], seen[0][j]), k
