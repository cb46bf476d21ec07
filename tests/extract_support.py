"""What the featx extract tests share: a generated dataset, a seeded tiny CNN saved as safetensors, a reference run.

A generated dataset in tmp_path (24 PNG/JPEG images in two class folders, one corrupt file) and a small
seeded CNN saved as safetensors; the torchrun tests run real ``torchrun --nproc-per-node 2`` on CPU (gloo).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import featx
from featx.extraction import ExtractResult

ROOT = Path(__file__).resolve().parents[1]
SPEC = "tests.extract_support:TinyNet"
CLASSES = ("cat", "dog")
PER_CLASS = 12
CORRUPT = "dog/corrupt.jpg"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TinyNet(nn.Module):
    """stem, bn, act, block, pool, head; the root flattens before ``head`` (glue), and with ``glue=True``
    adds 1 before ``block`` too (a lost glue: the cut at ``block`` is then not faithful)."""

    pretrained_cfg = {"input_size": (3, 32, 32)}  # noqa: RUF012 (timm's attribute, read-only here)

    def __init__(self, glue: bool = False, fail: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.block = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 5)
        self.glue, self.fail = glue, fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("this model cannot run")
        x = self.act(self.bn(self.stem(x)))
        if self.glue:
            x = x + 1
        return self.head(torch.flatten(self.pool(self.block(x)), 1))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Two small RGB images of different sizes (a test module may define its own `images`)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():  # BN statistics that are not the identity, so eval mode matters
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir()
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    (root / CORRUPT).write_bytes(b"\xff\xd8 not a jpeg")
    return root


def keys_of(data: Path) -> list[str]:
    return sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file())


def run(data: Path | str, out: Path, weights: Path, **kwargs: object) -> ExtractResult:
    options = {"upto": "block", "outputs": ["act", "block"], "pool": {"block": "avg"}, "workers": 0}
    options.update({"batch_size": 4, "shard_size": 7, "progress": False, **kwargs})
    return featx.extract(SPEC, data, out, weights=str(weights), **options)


def cli(data: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return [
        "extract", SPEC, "--data", str(data), "--out", str(out), "--weights", str(weights),
        "--upto", "block", "--outputs", "act,block", "--pool", "block=avg",
        "--batch-size", "4", "--shard-size", "7", "--workers", "0", "--no-progress", *extra,
    ]  # fmt: skip


def set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced (or ``flag value`` appended; ``--model-kwarg`` always appends)."""
    if flag in argv and flag != "--model-kwarg":
        return [*argv[: argv.index(flag) + 1], value, *argv[argv.index(flag) + 2 :]]
    return [*argv, flag, value]


def expected(
    data: Path, weights: Path, config: dict | None = None, settings: dict | None = None, pooled: str = "block"
) -> dict[str, dict]:
    """What the built backbone gives on the same preprocessed tensors, batched as extract batches them:
    shards of 7 sorted keys, batches of 4 within a shard, failed images left out; ``pooled`` avg-pooled."""
    from timm.data import create_transform

    batch_size, shard_size = 4, 7
    # default: the ImageNet eval transform at the model's 32 px: resize 36 (32 / 0.875), center crop 32
    settings = settings or {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 0.875}
    transform = create_transform(**settings, mean=MEAN, std=STD)
    config = config or {"model": SPEC, "weights": str(weights), "upto": "block", "outputs": ["act", "block"]}
    backbone = featx.build_backbone(config)
    keys = keys_of(data)
    result = {}
    for s in range(0, len(keys), shard_size):
        shard = keys[s : s + shard_size]
        for b in range(0, len(shard), batch_size):
            batch = [k for k in shard[b : b + batch_size] if k != CORRUPT]
            x = torch.stack([transform(Image.open(data / k).convert("RGB")) for k in batch])
            with torch.no_grad():
                y = dict(backbone(x))
            y[pooled] = torch.flatten(nn.functional.adaptive_avg_pool2d(y[pooled], 1), 1)
            for j, k in enumerate(batch):
                result[k] = {name: t[j] for name, t in y.items()}
    return result


@pytest.fixture(scope="module")
def reference(data: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One single-process extraction the other tests compare with."""
    out = tmp_path_factory.mktemp("reference") / "features"
    run(data, out, weights)
    return out


def assert_same_features(a: Path, b: Path) -> None:
    fa, fb = featx.open_features(a), featx.open_features(b)
    assert fa.keys == fb.keys
    for name in fa.outputs:
        assert torch.equal(fa.tensor(name), fb.tensor(name)), name
