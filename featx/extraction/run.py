"""``featx.extract``: a dataset through a verified cut into shards, every sample exactly once, resumable.

The unit of work is an input shard: ``shard_size`` consecutive samples in sorted key order. With W ranks
(``torchrun``: ``WORLD_SIZE``/``RANK`` in the environment, one process each), rank r takes shards r, r+W,
r+2W, ... — no sampler padding, so no sample is run twice and none is dropped. A shard whose done marker
exists with this run's fingerprint, whose samples' signature (keys, labels and file stamps, as listed now)
is the one its marker records, and whose files match the marker's digests (size and sha256, read once by the
rank that owns the shard) is skipped: a rerun after a crash does only what is missing or damaged, and a shard
whose images changed is computed again rather than served stale. A rank with shards to compute removes the
manifest first. Rank 0 writes the manifest after a barrier, once it has checked that every sample is in one
row or listed as failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, cast

import torch
from torch import nn

from featx._version import __version__
from featx.backbone import backbone_config, is_spec
from featx.errors import FeatxError, Interrupted, listing
from featx.extraction import folder, loop, ranks, signals, writer
from featx.extraction.model import Extractor, Plan, output_shapes, plan
from featx.extraction.preprocess import Preprocessing, resolve_preprocessing
from featx.extraction.sources import Dataset, open_source, signature
from featx.model_sources import COMMAND_LINE, ModelSource
from featx.numerics import Numerics, environment
from featx.verification import verify_cuts

FORMATS = ("safetensors", "npy")
_PHASES = ("decode", "transform", "model", "write")


class OutputLayout(TypedDict):
    """How one output is stored: the child it taps, its pooling and dtype, its shape per sample."""

    child: str
    pool: str
    dtype: str
    shape: list[int]


@dataclass
class ExtractResult:
    """What one run did. ``exit_code``: 0 every sample extracted, 1 some failed (listed in ``failed``)."""

    out: Path
    model: str
    upto: str
    format: str
    preprocessing: Preprocessing
    verified: str  # one line: what the first-batch check found
    outputs: dict[str, OutputLayout]
    samples: int
    rows: int
    failed: list[dict[str, str]]
    shards: int
    computed: int  # shards this run wrote (all ranks)
    resumed: int  # shards a previous run had finished
    seconds: dict[str, float]  # decode, transform (summed over workers), model, write; wall
    images: int  # images this run decoded and ran (all ranks)
    world_size: int = 1
    rank: int = 0
    manifest: Path | None = None  # None on ranks other than 0
    unfaithful: list[str] = field(default_factory=list)
    repaired: int = 0  # of ``computed``: shards whose previous marker or files failed verification
    changed: int = 0  # of ``computed``: shards a previous run had finished whose images changed since
    environment: dict[str, object] = field(default_factory=dict)  # featx.numerics.environment of this rank

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds["wall"] if self.seconds.get("wall") else 0.0

    def _recomputed(self) -> str:
        """`` (1 failed verification, 2 with changed images)``: why shards a previous run had finished were
        computed again; empty when none were."""
        why = [f"{self.repaired} failed verification"] if self.repaired else []
        why += [f"{self.changed} with changed images"] if self.changed else []
        return f" ({', '.join(why)})" if why else ""

    def to_dict(self) -> dict[str, object]:
        return {
            "out": str(self.out),
            "manifest": str(self.manifest) if self.manifest else None,
            "model": self.model,
            "upto": self.upto,
            "format": self.format,
            "preprocessing": self.preprocessing.to_dict(),
            "verified": self.verified,
            "unfaithful": self.unfaithful,
            "outputs": self.outputs,
            "samples": self.samples,
            "rows": self.rows,
            "failed": self.failed,
            "shards": {
                "total": self.shards,
                "computed": self.computed,
                "resumed": self.resumed,
                "repaired": self.repaired,
                "changed": self.changed,
            },
            "world_size": self.world_size,
            "images": self.images,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "images_per_second": round(self.images_per_second, 2),
            "exit_code": self.exit_code,
            "environment": self.environment,
        }

    def __str__(self) -> str:
        from featx.render.text import table

        rows = [
            [name, o["child"], o["pool"], o["dtype"], "x".join(map(str, o["shape"])) or "scalar"]
            for name, o in self.outputs.items()
        ]
        s = self.seconds
        lines = [
            f"featx extract  {self.model}  cut at `{self.upto}`  -> {self.out} ({self.format}, "
            f"{self.shards} shard{'s' if self.shards != 1 else ''}, {self.world_size} rank{'s' if self.world_size != 1 else ''})",
            f"preprocessing  {self.preprocessing}",
            f"verified       {self.verified}",
            "",
            *table(["output", "child", "pool", "dtype", "shape per sample"], rows),
            "",
            f"samples {self.samples}: {self.rows} extracted, {len(self.failed)} failed; shards: "
            f"{self.computed} computed{self._recomputed()}, {self.resumed} already done",
            f"time  decode {s['decode']:.2f} s  transform {s['transform']:.2f} s  model {s['model']:.2f} s  "
            f"write {s['write']:.2f} s  (wall {s['wall']:.2f} s, {self.images_per_second:.1f} images/s)",
        ]
        if self.failed:
            lines.append(f"failed ({len(self.failed)}):")
            lines += [f"  {f['key']}  {f['reason']}" for f in self.failed[:20]]
            if len(self.failed) > 20:
                lines.append(f"  ... ({len(self.failed) - 20} more in the manifest)")
        if self.manifest is not None:
            lines.append(f"wrote {self.manifest}")
        return "\n".join(lines)


def extract(
    model: str | os.PathLike[str] | Mapping[str, object] | ModelSource,
    data: str | os.PathLike[str] | list[str | os.PathLike[str]] | tuple[str | os.PathLike[str], ...],
    out: str | os.PathLike[str],
    *,
    upto: str | int | None = None,
    keep_glue: bool = False,
    leaf_functions: Sequence[Callable[..., Any]] = (),
    outputs: Sequence[str] | None = None,
    pool: str | Mapping[str, str] = "none",
    dtype: str | Mapping[str, str] = "float32",
    weights: str | os.PathLike[str] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
    random_weights: bool = False,
    seed: int = 0,
    batch_size: int = 32,
    shard_size: int = 1024,
    workers: int | None = None,
    format: str = "safetensors",
    device: str = "cpu",
    overwrite: bool = False,
    allow_unfaithful: bool = False,
    channels_last: bool = False,
    autocast: bool = False,
    compile: bool = False,
    progress: bool | None = None,
) -> ExtractResult:
    """Run every sample of ``data`` through the cut and store the features in ``out``.

    ``model`` is a SPEC (``torchvision/resnet50``; needs ``upto``; ``outputs`` taps kept children,
    default the cut; ``keep_glue`` keeps the root's glue up to the cut, its trace keeping each function
    of ``leaf_functions`` whole, as ``featx.truncate`` does), a ``featx.models.ModelSource``
    (a SPEC with its weights and kwargs already parsed, ``ModelSource.parse``: taken as a SPEC is; its own
    seed, if it has one, wins over ``seed``) or a backbone config (a ``.yaml`` path or mapping) whose
    ``outputs`` are the taps and whose ``data:`` section overrides preprocessing.
    ``upto`` and ``outputs`` take child names, counts and dotted paths (``layer3.1``), as ``featx verify``
    does. ``weights`` is a weights file or a pretrained weights name (``DEFAULT``, ``IMAGENET1K_V1``, a timm
    tag, ``hf-hub:org/name``) read from torch's or the hub's cache, as ``featx.load_model`` takes it, and
    ``weights_prefix`` is stripped from a file's keys; ``model_kwargs``' download switches (``weights=``,
    ``pretrained=``) are weights too. A model that gets no weights is refused unless ``random_weights``:
    then its init is seeded by ``seed`` (the same in every run, rank and resume) and the fingerprint
    records ``{"random": true, "seed": seed}``; with weights it records the file loaded and its sha256.
    ``pool`` and ``dtype`` are one value for every output or ``{output: value}``. ``data``: see
    ``featx.extraction.sources.open_source``. Under ``torchrun`` each process is one rank; call it the same
    way in every process.

    Before anything is written, the cut is run on the first batch and verified (eval mode) against the
    full model on that batch; an unfaithful cut is refused unless ``allow_unfaithful``. Corrupt or
    unreadable images do not stop the run: they are listed in ``ExtractResult.failed`` and the manifest.
    On an existing run, a shard whose images changed since it was written (size, modification time or
    readability of a file, see ``featx.extraction.sources.Stamp``) is computed again
    (``ExtractResult.changed``); the others are kept.

    Raises:
        FeatxError: bad input (a missing or empty ``data``, an ``out`` holding another run or other
            files, a model without weights and no ``random_weights``, a tap that is not a child, a model failing on the first batch, an unfaithful cut, an
            unwritable ``out``); nothing is left that a rerun would trust. A full disk mid-run is
            ``featx.errors.Unfinished``, a FeatxError the command line exits 3 for: the same call resumes.
        Interrupted: the run did not finish — SIGINT or SIGTERM (handled alike, from the main thread),
            its torchrun launcher died, or another rank failed; the message says how many shards are done,
            and the same call resumes.
    """
    out = Path(out)
    where = _Where(out)  # how far the run got, for the line an interruption prints
    with signals.stopping_on_signals(), _stopped_at(where):
        if batch_size < 1 or shard_size < 1:
            raise FeatxError(f"--batch-size and --shard-size must be >= 1, got {batch_size} and {shard_size}")
        if format not in FORMATS:
            raise FeatxError(f"--format `{format}` is not accepted; accepted: {listing(FORMATS)}")
        dataset = open_source(data)
        if upto is None and is_spec(model):
            spec = model.spec if isinstance(model, ModelSource) else model
            raise FeatxError(
                f"extract `{spec}` needs --upto (where to cut), or give a backbone config (.yaml)"
            )
        # the model, its weights, the cut and the taps, parsed once into one value (the rule of every verb):
        # what the plan, the fingerprint and the preprocessing read
        cfg = backbone_config(
            model,
            upto=upto,
            outputs=outputs or None,
            keep_glue=keep_glue or None,
            leaf_functions=leaf_functions or None,
            weights=weights,
            weights_prefix=weights_prefix,
            model_kwargs=model_kwargs,
            seed=seed,  # what no weights cover: a random init, the tail a weights file need not hold
            names=COMMAND_LINE,
        )
        the_plan = plan(cfg, pool=pool, dtype=dtype, random_weights=random_weights)
        if format == "npy" and "bfloat16" in the_plan.dtypes.values():
            raise FeatxError(
                "--dtype bfloat16 cannot be stored in .npy (numpy has no bfloat16); use float16 or --format safetensors"
            )
        if any(name in (writer.INDEX, writer.METADATA) for name in the_plan.taps):
            raise FeatxError(
                f"output names `{writer.INDEX}` and `{writer.METADATA}` are reserved; rename the output"
            )
        numerics = Numerics(autocast=autocast, compile=compile, channels_last=channels_last)
        prep = resolve_preprocessing(the_plan.full, the_plan.source, the_plan.data)
        fingerprint = _fingerprint(the_plan, prep, dataset, shard_size, format, numerics)
        fingerprint_id = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        resuming = folder.check_folder(
            out, fingerprint_id, fingerprint, overwrite, environment(ranks.device_of(device), numerics)
        )
        where.fingerprint_id, where.shards = fingerprint_id, len(dataset.shards(shard_size))
        with ranks.ranks(device) as (rank, world, dev, run_id):
            shards = dataset.shards(shard_size)
            # rank 0's: each rank lists --data itself, and a file changing in between must not make the ranks
            # disagree on which markers count
            inputs = ranks.from_rank_0([signature(shard) for shard in shards], world)
            # The check runs on CPU before the cut moves to the device: a SPEC's cut shares the full model's modules.
            first, first_keys = loop.first_batch(dataset.samples, prep, min(batch_size, VERIFY_IMAGES))
            extractor: nn.Module = Extractor(the_plan.runner, the_plan.pools).eval()
            shapes = output_shapes(extractor, first[:1], first_keys[:1])
            verified, unfaithful = _verify(the_plan, first, first_keys, allow_unfaithful)
            env = environment(dev, numerics)
            extractor = extractor.to(dev)
            if channels_last:  # not numerics.model: its cast to float32 would cast a float64 buffer too
                extractor = extractor.to(memory_format=torch.channels_last)
            if compile:  # compiled on its first batch in the loop, and again when a shard's last is smaller
                extractor = cast(nn.Module, torch.compile(extractor))
            layout = {
                name: OutputLayout(
                    child=the_plan.taps[name],
                    pool=the_plan.pools[name],
                    dtype=the_plan.dtypes[name],
                    shape=list(shape[1:]),
                )
                for name, shape in shapes.items()
            }
            names = list(layout)
            if rank == 0:  # nobody writes before the barrier below
                folder.remove_temporaries(out)
                if not resuming and out.exists():
                    folder.clear(out)
                if not resuming or folder.fingerprint_id_of(out) != fingerprint_id:
                    writer.write_fingerprint(out, fingerprint_id, fingerprint, env)
            ranks.barrier(world, dev)
            mine, repairs = (
                [],
                {},
            )  # a done shard is verified here, once: its files against its marker's digests
            sample_keys = [s.key for s in dataset.samples]
            for i in range(rank, len(shards), world):
                marker, problem = writer.shard_state(
                    out, i, fingerprint_id, format, names, inputs[i], keys=sample_keys
                )
                if marker is None:
                    mine.append(i)
                if problem is not None:
                    repairs[i] = problem
            if mine:
                writer.retract_manifest(out)
            exit_after = int(os.environ.get(writer.EXIT_AFTER_ENV, "0") or 0)
            started = time.perf_counter()
            sample_shapes = {name: o["shape"] for name, o in layout.items()}
            batches = loop.Loop(
                extractor,
                the_plan.dtypes,
                sample_shapes,
                prep,
                dev,
                batch_size,
                workers,
                numerics,
            )
            shown = progress if rank == 0 else False
            # a shard is written in a thread while the next one is computed; the writer finishes its
            # shard before the loop goes on from here, whatever stopped the loop
            with (
                writer.Behind() as behind,
                contextlib.closing(batches(shards, mine, progress=shown)) as finished,  # workers end here
            ):
                for written, (i, shard) in enumerate(finished, 1):
                    behind.submit(
                        writer.write_shard,
                        out,
                        i,
                        format,
                        fingerprint_id,
                        run_id,
                        rank,
                        inputs=inputs[i],
                        **shard,
                        repaired=repairs.get(i),
                        environment=env,
                    )
                    if exit_after and written >= exit_after:
                        behind.wait()
                        sys.stderr.flush()
                        os._exit(17)  # fault injection: this rank dies mid-run, as a killed process would
            ranks.barrier(world, dev)
            wall = time.perf_counter() - started
            manifest_path = None
            if rank == 0:
                writer.assemble(
                    out,
                    format,
                    fingerprint_id,
                    fingerprint,
                    layout,
                    [s.key for s in dataset.samples],
                    dataset.classes,
                    inputs,
                    env,
                )
                manifest_path = out / writer.MANIFEST
            ranks.barrier(world, dev)
        found = [
            writer.done(out, i, fingerprint_id, format, names, inputs[i], verify=False)
            for i in range(len(shards))
        ]
        markers = [m for m in found if m is not None]
        ran = [m for m in markers if m.get("run") == run_id]
        seconds: dict[str, float] = {p: sum(m["seconds"].get(p, 0.0) for m in ran) for p in _PHASES}
        seconds["wall"] = wall
        return ExtractResult(
            out=out,
            model=the_plan.config or the_plan.spec,
            upto=the_plan.upto,
            format=format,
            preprocessing=prep,
            verified=verified,
            outputs=layout,
            samples=len(dataset.samples),
            rows=sum(m["rows"] for m in markers),
            failed=[f for m in markers for f in m["failed"]],
            shards=len(shards),
            computed=len(ran),
            resumed=len(shards) - len(ran),
            repaired=sum(1 for m in ran if m.get("repaired") not in (None, writer.CHANGED)),
            seconds=seconds,
            images=sum(m["rows"] + len(m["failed"]) for m in ran),
            world_size=world,
            rank=rank,
            manifest=manifest_path,
            unfaithful=unfaithful,
            changed=sum(1 for m in ran if m.get("repaired") == writer.CHANGED),
            environment=env,
        )


@dataclass
class _Where:
    """How far a run got, for the one line that says where it stopped."""

    out: Path
    fingerprint_id: str | None = None  # known once the folder is checked
    shards: int | None = None

    def stopped(self, cause: str) -> Interrupted:
        if self.fingerprint_id is None or self.shards is None:
            return Interrupted(f"{cause} before it wrote anything; rerun the same command to start it")
        done = writer.finished_shards(self.out, self.fingerprint_id, self.shards)
        if done == self.shards:
            return Interrupted(
                f"{cause} after all {done} shards, before the manifest; rerun the same command to write it"
            )
        return Interrupted(f"{cause} after {done} of {self.shards} shards; rerun the same command to resume")


@contextlib.contextmanager
def _stopped_at(where: _Where) -> Iterator[None]:
    """A signal or a failed rank inside the block becomes ``Interrupted``, saying how far the run got."""
    try:
        yield
    except KeyboardInterrupt as err:
        name = err.name if isinstance(err, signals.Signalled) else "SIGINT"
        raise where.stopped(f"interrupted by {name}") from None
    except ranks.RankFailed as err:
        raise where.stopped(f"stopped because another rank of the run failed ({err})") from None


VERIFY_IMAGES = 4  # the first batch the cut is verified on, capped: the check costs ~2 forwards of it


def _verify(
    the_plan: Plan, x: torch.Tensor, keys: Sequence[str], allow_unfaithful: bool
) -> tuple[str, list[str]]:
    """Verify the cut (and every tap) against the full model on the first batch, eval mode."""
    cuts = list(the_plan.cuts)  # as the runner runs them: a container a tap reaches into, child by child
    try:
        reports = list(
            verify_cuts(
                the_plan.full,
                cuts,
                x,
                modes=("eval",),
                keep_glue=the_plan.keep_glue,
                leaf_functions=the_plan.leaf_functions,
                # a config's backbone taps what each module returns; a --keep-glue cut is truncate()'s
                model_output=the_plan.model_output,
            )
        )
    except FeatxError as err:
        raise FeatxError(
            f"the model fails on the first batch ({len(keys)} images from `{keys[0]}`): {err}"
        ) from None
    reasons = [f"`{r.upto}`: {reason}" for r in reports if not r.faithful for reason in r.reasons]
    where = listing([cut.upto for cut in cuts])
    if not reasons:
        return f"faithful in eval mode on the first {len(keys)} images, at {where}", []
    if not allow_unfaithful:
        raise FeatxError(
            f"the cut is NOT faithful on the first {len(keys)} images: {reasons[0]}"
            + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else "")
            + "; pass --allow-unfaithful to extract anyway"
        )
    return (
        f"NOT faithful on the first {len(keys)} images at {where}; extracted anyway (--allow-unfaithful)",
        reasons,
    )


def _fingerprint(
    the_plan: Plan,
    prep: Preprocessing,
    dataset: Dataset,
    shard_size: int,
    fmt: str,
    numerics: Numerics,
) -> dict[str, object]:
    """What the stored features are a function of. Two runs with equal fingerprints write equal shards
    (on the same kind of device); the device and batch size are not in it, nor what of the numeric
    environment does not change the numbers (thread count, device name: fingerprint.json's
    ``environment``). ``compile`` is in it only when true, so stores written before it was recorded resume."""
    # surrogateescape: a file name that is not UTF-8 keeps its bytes (valid names hash as before)
    joined = "\n".join(s.key for s in dataset.samples)
    keys = hashlib.sha256(joined.encode("utf-8", "surrogateescape")).hexdigest()
    source = the_plan.source.fingerprint()  # the weights file (a name's cache file) hashed once
    kwargs = source["model_kwargs"]
    return {
        "model": the_plan.spec,
        # the constructor's kwargs change the features (`output_stride=8`); left out when there are none, so
        # stores written before they were recorded keep resuming
        **({"model_kwargs": kwargs} if kwargs else {}),
        "config": the_plan.config,
        "weights": source["weights"],
        "cut": the_plan.upto,
        "keep_glue": the_plan.keep_glue,
        "taps": dict(the_plan.taps),
        "pool": dict(the_plan.pools),
        "dtype": dict(the_plan.dtypes),
        "preprocessing": prep.to_dict(),
        "data": {
            "kind": dataset.kind,
            "samples": len(dataset.samples),
            "keys_sha256": keys,
            "shard_size": shard_size,
        },
        "format": fmt,
        "autocast": numerics.autocast,
        "channels_last": numerics.channels_last,
        **({"compile": True} if numerics.compile else {}),
        "featx": __version__,
        "torch": torch.__version__,
    }
