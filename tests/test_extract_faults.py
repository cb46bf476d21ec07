"""featx extract under faults: never stuck on its own leftovers, --out refused in one line, signals and ranks.

Runs that corrupt a store work on a copy of the reference run (tests/extract_support.py). The signal and
torchrun tests run real processes: ``python -m featx extract`` and ``torchrun --nproc-per-node 2`` (CPU, gloo),
on a model slowed down by ``FEATX_TEST_SLOW`` seconds per forward so a signal lands mid-run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from featx.cli import main
from tests.extract_support import (  # its fixtures (data, weights, reference) come through conftest.py
    CORRUPT,
    PER_CLASS,
    ROOT,
    TinyNet,
    assert_same_features,
    cli,
    keys_of,
    run,
    set_flag,
)

SLOW_SPEC = "tests.test_extract_faults:SlowNet"
SHARDS = 2 * PER_CLASS + 1  # the signal tests' shards: one sample each


class SlowReLU(nn.ReLU):
    """``ReLU`` sleeping ``FEATX_TEST_SLOW`` seconds per call (default 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(float(os.environ.get("FEATX_TEST_SLOW", "0")))
        return super().forward(x)


class SlowNet(TinyNet):
    """``TinyNet`` whose kept child ``act`` sleeps ``FEATX_TEST_SLOW`` seconds per batch, so that a run
    lasts long enough to be interrupted mid-way; the same weights and the same features."""

    def __init__(self, **kwargs: bool) -> None:
        super().__init__(**kwargs)
        self.act = SlowReLU()


def copy_of(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    return out


def interrupted_copy(reference: Path, tmp_path: Path) -> Path:
    """A copy of the reference run as a run killed after its first two shards would leave it."""
    out = copy_of(reference, tmp_path)
    for path in [
        out / "manifest.json",
        *out.glob("shard-00002.*"),
        *out.glob("*/*-00002.*"),
        out / "shard-00003.done",
    ]:
        path.unlink()
    return out


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


# the temporary files `replacing` leaves when a write is killed, one per kind of file featx writes
TEMPORARIES = {
    "fingerprint": ".fingerprint.json.abc123",
    "shard": ".shard-00002.safetensors.k2j_9x1q",
    "marker": ".shard-00001.done.q8w7e6r5",
    "manifest": ".manifest.json.a1b2c3d4",
    "npy output": "block/.block-00002.npy.zz81hh2e",
    "npy metadata": "metadata/.metadata-00002.parquet.p0o9i8u7",
}


@pytest.mark.parametrize("state", ["finished", "interrupted"])
@pytest.mark.parametrize("kind", list(TEMPORARIES))
def test_a_leftover_temporary_is_removed_and_the_same_command_finishes(
    kind: str, state: str, data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    fmt = "npy" if kind.startswith("npy") else "safetensors"
    source = reference if fmt == "safetensors" else tmp_path / "npy"
    if fmt == "npy":
        run(data, source, weights, format="npy")
    out = (copy_of if state == "finished" else interrupted_copy)(source, tmp_path)
    (out / TEMPORARIES[kind]).write_bytes(b"half a file")
    result = run(data, out, weights, format=fmt)
    assert (result.computed, result.resumed) == ((0, 4) if state == "finished" else (2, 2))
    assert [p.relative_to(out).as_posix() for p in out.rglob(".*")] == []
    assert_same_features(out, reference)


def test_a_folder_holding_only_a_fingerprint_temporary_starts_the_run(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".fingerprint.json.abc123").write_text('{"id": "0123')  # killed while writing it
    result = run(data, out, weights)
    assert (result.computed, result.resumed) == (4, 0)
    assert not (out / ".fingerprint.json.abc123").exists()
    assert_same_features(out, reference)


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_bad_fingerprint_with_this_runs_markers_is_rewritten_and_the_run_resumes(
    damage: str,
    data: Path,
    weights: Path,
    reference: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = copy_of(reference, tmp_path)
    if damage == "corrupt":
        (out / "fingerprint.json").write_text('{"id": "12')
    else:
        (out / "fingerprint.json").unlink()
    assert main(cli(data, out, weights)) == 1  # the corrupt image
    assert "samples 25: 24 extracted, 1 failed; shards: 0 computed, 4 already done" in capsys.readouterr().out
    assert (out / "fingerprint.json").read_text() == (reference / "fingerprint.json").read_text()
    assert_same_features(out, reference)


def test_a_corrupt_fingerprint_with_another_runs_markers_is_refused_then_overwrite_starts_over(
    data: Path, weights: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_of(reference, tmp_path)
    for path in [*out.glob("*.done"), out / "manifest.json"]:  # another run's: another fingerprint
        content = json.loads(path.read_text())
        content["fingerprint" if path.suffix == ".done" else "fingerprint_id"] = "0123456789abcdef"
        path.write_text(json.dumps(content))
    (out / "fingerprint.json").write_text("not json")
    assert main(cli(data, out, weights)) == 2
    assert one_error_line(capsys).startswith(
        f"featx: error: --out `{out}`: fingerprint.json cannot be read (Expecting value: line 1 column 1 "
        "(char 0)) and its shards are another extraction's; pass --overwrite to start over"
    )
    assert (out / "fingerprint.json").read_text() == "not json"  # nothing touched
    assert main([*cli(data, out, weights), "--overwrite"]) == 1
    assert "shards: 4 computed, 0 already done" in capsys.readouterr().out
    assert_same_features(out, reference)


def test_overwrite_starts_over_on_a_folder_featx_wrote(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    out = copy_of(reference, tmp_path)
    (out / "shard-00009.safetensors").write_bytes(b"a shard of a larger run before")
    result = run(data, out, weights, overwrite=True)
    assert (result.computed, result.resumed) == (4, 0)
    assert not (out / "shard-00009.safetensors").exists()
    assert_same_features(out, reference)


def test_overwrite_refuses_a_folder_holding_someone_elses_file_and_names_it(
    data: Path, weights: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_of(reference, tmp_path)
    (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    assert main([*cli(data, out, weights), "--overwrite"]) == 2
    assert one_error_line(capsys) == (
        f"featx: error: --out `{out}` holds files that are not a featx extraction (`notes.txt`); "
        "give a new or empty folder, or move them away"
    )
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_file_of_someone_else_in_an_output_folder_is_named(
    data: Path, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    (out / "block").mkdir(parents=True)
    (out / "block" / "block-00000.npy").write_bytes(b"")  # featx's name
    (out / "block" / "mine.npy").write_bytes(b"")
    assert main([*cli(data, out, weights), "--overwrite"]) == 2
    assert "(`block/mine.npy`)" in one_error_line(capsys)
    assert sorted(p.name for p in (out / "block").iterdir()) == ["block-00000.npy", "mine.npy"]


@pytest.mark.parametrize("case", ["below a file", "proc", "sys", "read-only", "not writable"])
def test_an_out_that_cannot_be_a_folder_is_one_line_exit_2_and_nothing_is_written(
    case: str, data: Path, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "folder").mkdir()
    out, message = {
        "below a file": (
            tmp_path / "a_file" / "out",
            f"--out `{tmp_path}/a_file/out`: `{tmp_path}/a_file` is a file, not a folder; give a folder path",
        ),
        "proc": (
            Path("/proc/featx-test/out"),
            "--out `/proc/featx-test/out` is on /proc, which holds no files; give a folder on a disk",
        ),
        "sys": (
            Path("/sys/featx-test"),
            "--out `/sys/featx-test` is on /sys, which holds no files; give a folder on a disk",
        ),
        "read-only": (
            tmp_path / "folder" / "out",
            f"--out `{tmp_path}/folder/out`: `{tmp_path}/folder` is on a read-only filesystem; "
            "give a writable folder",
        ),
        "not writable": (
            tmp_path / "folder" / "new" / "out",
            f"--out `{tmp_path}/folder/new/out`: folder `{tmp_path}/folder` is not writable (permission denied)",
        ),
    }[case]
    if case in ("proc", "sys") and not Path(f"/{case}/self" if case == "proc" else "/sys/kernel").exists():
        pytest.skip(f"no /{case} here")
    if case == "read-only":  # a read-only mount cannot be made in a test: statvfs says so instead
        real = os.statvfs

        class ReadOnly:
            def __init__(self, path: str) -> None:
                self.f_flag = real(path).f_flag | os.ST_RDONLY

        monkeypatch.setattr(os, "statvfs", ReadOnly)
    if case == "not writable":  # root may write anywhere: access() says no instead
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "folder")
    assert main(cli(data, out, weights)) == 2
    assert one_error_line(capsys) == f"featx: error: {message}"
    assert not out.exists()
    assert os.listdir(tmp_path / "folder") == []


def test_the_manifest_says_whether_every_sample_was_extracted(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    assert json.loads((reference / "manifest.json").read_text())["status"] == "complete_with_failures"
    good = tmp_path / "good.txt"
    good.write_text("".join(f"{data / k}\n" for k in keys_of(data) if k != CORRUPT))
    run(good, tmp_path / "out", weights)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "complete"


def slow_cli(data: Path, out: Path, weights: Path) -> list[str]:
    """The slowed-down model, one sample per shard, two DataLoader workers."""
    argv = [*cli(data, out, weights)]
    argv[1] = SLOW_SPEC
    for flag, value in [("--shard-size", "1"), ("--batch-size", "1"), ("--workers", "2")]:
        argv = set_flag(argv, flag, value)
    return argv


def slow_env(seconds: str = "0.1") -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FEATX_TEST_SLOW": seconds}


def as_from_a_shell() -> None:
    """In the child before exec: SIGINT and SIGTERM at their defaults and unblocked, as a shell starts a
    command. A pytest worker may have inherited SIGINT ignored or blocked, and a child keeps both across exec,
    so the run would never see the signal (seen in full-suite runs, never in this file alone)."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def wait_for_markers(out: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(list(out.glob("*.done"))) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("signum", "target"),
    [
        pytest.param(signum, target, id=f"{signum.name}-{target}")
        for target in ("process", "group")
        for signum in (signal.SIGTERM, signal.SIGINT)
    ],
)
def test_a_signal_stops_the_run_with_one_line_and_exit_3_and_the_same_command_resumes(
    signum: signal.Signals, target: str, data: Path, weights: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """``group``: the DataLoader's workers get the signal too, as from Ctrl-C in a terminal or Slurm."""
    out = tmp_path / "out"
    argv = slow_cli(data, out, weights)
    process = subprocess.Popen(
        [sys.executable, "-m", "featx", *argv], env=slow_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True, preexec_fn=as_from_a_shell,
    )  # fmt: skip
    wait_for_markers(out, 3, process)
    if target == "group":
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    done = len(list(out.glob("*.done")))
    assert (process.returncode, stdout) == (3, "")
    assert stderr == (
        f"featx: interrupted by {signum.name} after {done} of {SHARDS} shards; rerun the same command to resume\n"
    )
    assert 3 <= done < SHARDS and not (out / "manifest.json").exists()
    assert [p.name for p in out.rglob(".*")] == []
    assert main(argv) == 1  # the same command (not slowed down here) finishes, the corrupt image failed
    assert f"shards: {SHARDS - done} computed, {done} already done" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete_with_failures"
    uninterrupted = tmp_path / "uninterrupted"
    assert main(slow_cli(data, uninterrupted, weights)) == 1
    assert_same_features(out, uninterrupted)


def torchrun_process(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "featx", *argv]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ranks_of(launcher: int) -> dict[int, int]:
    """``{rank: pid}`` of the processes torchrun's launcher ``launcher`` started (Linux /proc)."""
    ranks = {}
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for child in (task / "children").read_text().split():
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            rank = next((v[5:] for v in environ if v.startswith(b"RANK=")), None)
            if rank is not None:
                ranks[int(rank)] = int(child)
    return ranks


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie nobody reaped counts as ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.torchrun
def test_killing_one_rank_ends_the_other_ranks_promptly_with_one_line(
    data: Path, weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    process = torchrun_process(slow_cli(data, out, weights), slow_env("0.2"))
    wait_for_markers(out, 2, process)
    ranks = ranks_of(process.pid)
    assert sorted(ranks) == [0, 1]
    killed_at = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - killed_at < 30  # not gloo's 30-minute timeout
    assert process.returncode == 1  # torchrun's code for any failed rank
    assert not running(ranks[0])
    lines = [line for line in stderr.splitlines() if line.startswith("featx: ")]
    assert len(lines) == 1, stderr
    assert re.fullmatch(  # torchrun's agent stops it with SIGTERM, or its barrier sees the dead peer first
        r"featx: (interrupted by SIGTERM|stopped because another rank of the run failed \(.+\)) after "
        rf"(\d+ of {SHARDS} shards; rerun the same command to resume"
        rf"|all {SHARDS} shards, before the manifest; rerun the same command to write it)",
        lines[0],
    )
    assert "ConnectionResetError" not in stderr and "DistBackendError" not in stderr
    assert not (out / "manifest.json").exists()  # how a scheduler tells "did not finish" under torchrun


@pytest.mark.torchrun
def test_no_rank_outlives_a_killed_launcher(data: Path, weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # half a second per sample: the ranks have some 6 s of work left when the launcher dies
    process = torchrun_process(slow_cli(data, out, weights), slow_env("0.5"))
    wait_for_markers(out, 2, process)
    ranks = ranks_of(process.pid)
    assert sorted(ranks) == [0, 1]
    process.kill()
    process.wait(timeout=30)  # not communicate(): the ranks hold its pipes open as long as they live
    deadline = time.monotonic() + 3
    while any(running(pid) for pid in ranks.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [rank for rank, pid in ranks.items() if running(pid)] == []
    assert len(list(out.glob("*.done"))) < SHARDS and not (out / "manifest.json").exists()
    process.communicate(timeout=30)
