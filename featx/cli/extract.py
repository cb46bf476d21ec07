"""``featx extract SPEC|CONFIG --data PATH --out DIR``, and ``featx extract --verify DIR``."""

from __future__ import annotations

import argparse

from featx.cli.flags import count, cut_flags, model_flags, per_output, positive
from featx.cli.model import is_config, leaf_functions
from featx.cli.output import print_document
from featx.errors import FeatxError, Interrupted


def add_parser(commands: argparse._SubParsersAction) -> None:
    model = model_flags(
        seed="the random init with --random-weights",
        random_weights="extract a model that gets no weights, its init seeded by --seed (refused without this "
        "flag)",
        device="cpu, or cuda (each torchrun rank on its local GPU)",
        input_shape=False,  # the images' size is the data's and its preprocessing's
    )
    p = commands.add_parser(
        "extract",
        parents=[model, cut_flags(outputs=True)],
        help="run a dataset through a verified cut into shards + manifest (resumable; torchrun for ranks)",
        description="Run a dataset through a verified cut into shards and a manifest. Exit codes: 0 every "
        "sample extracted; 1 finished with failed samples (listed; manifest status complete_with_failures); "
        "2 bad usage or input; 3 did not finish (SIGINT/SIGTERM, another rank died, a full disk): rerun the same "
        "command to resume. Under torchrun, which exits 1 for any failed rank, manifest.json exists only "
        "when the run finished.",
    )
    p.add_argument(
        "spec",
        nargs="?",
        metavar="SPEC|CONFIG",
        help="a model spec (with --upto) or a backbone config (.yaml); not with --verify",
    )
    p.add_argument("--data", help="a folder of images, a .txt list of paths, or .tar shards (required)")
    p.add_argument("--out", help="the output folder (new, empty, or a run to resume) (required)")
    p.add_argument(
        "--verify",
        metavar="DIR",
        default=None,
        help="check the store in DIR (sizes, sha256, indexes) without computing anything; exit 0 intact, "
        "1 damaged, 3 not finished",
    )
    p.add_argument(
        "--pool",
        type=per_output,
        default="none",
        metavar="none|avg|max|cls",
        help="pooling for every output, or OUTPUT=POOL,... (default: none)",
    )
    p.add_argument(
        "--dtype",
        type=per_output,
        default="float32",
        metavar="float32|float16|bfloat16",
        help="storage dtype for every output, or OUTPUT=DTYPE,... (default: float32)",
    )
    p.add_argument("--batch-size", type=positive, default=32, help="images per forward (default: 32)")
    p.add_argument("--shard-size", type=positive, default=1024, help="samples per shard (default: 1024)")
    p.add_argument(
        "--workers", type=count, default=None, help="DataLoader worker processes (default: min(4, cores))"
    )
    p.add_argument("--format", choices=["safetensors", "npy"], default="safetensors", help="shard format")
    p.add_argument(
        "--channels-last", action="store_true", help="run the model in channels_last memory format"
    )
    p.add_argument("--autocast", action="store_true", help="autocast (bfloat16 on CPU, float16 on CUDA)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the cut (compiles on the first batch, once more for a shard's smaller last batch)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: remove featx's own files from --out (never anyone else's) and extract everything",
    )
    p.add_argument("--allow-unfaithful", action="store_true", help="extract even if the cut is not faithful")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        from featx.extraction import extract
    except KeyboardInterrupt:  # Ctrl-C while torch loads: nothing started, and still "did not finish"
        raise Interrupted(
            "interrupted by SIGINT before it wrote anything; rerun the same command to start it"
        ) from None

    if args.verify is not None:
        return _verify_store(args)
    absent = [
        flag
        for flag, value in (("SPEC|CONFIG", args.spec), ("--data", args.data), ("--out", args.out))
        if value is None
    ]
    if absent:
        raise FeatxError(f"featx extract needs {', '.join(absent)} (or --verify DIR to check a store)")
    result = extract(
        args.spec,
        args.data,
        args.out,
        upto=args.upto,
        keep_glue=args.keep_glue,
        # with a CONFIG, the config's `keep_glue` may be what keeps the glue: the override checks it
        leaf_functions=leaf_functions(args, args.keep_glue or is_config(args.spec)),
        outputs=args.outputs,
        pool=args.pool,
        dtype=args.dtype,
        weights=args.weights,
        weights_prefix=args.weights_prefix,
        model_kwargs=dict(args.model_kwarg),
        random_weights=args.random_weights,
        seed=args.seed,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        workers=args.workers,
        format=args.format,
        device=args.device,
        overwrite=args.overwrite,
        allow_unfaithful=args.allow_unfaithful,
        channels_last=args.channels_last,
        autocast=args.autocast,
        compile=args.compile,
        progress=False if args.no_progress else None,
    )
    if result.rank == 0:  # under torchrun, one summary
        print_document(result.to_dict() if args.json else str(result))
    return result.exit_code


def _verify_store(args: argparse.Namespace) -> int:
    """``featx extract --verify DIR``: one line per problem and a summary; nothing computed or written."""
    from featx.extraction.features import check_store

    given = [
        flag
        for flag, value in (("SPEC|CONFIG", args.spec), ("--data", args.data), ("--out", args.out))
        if value is not None
    ]
    if given:
        raise FeatxError(f"--verify checks a store on its own; drop {', '.join(given)}")
    check = check_store(args.verify)
    print_document(check.to_dict() if args.json else "\n".join(check.lines()))
    return check.exit_code
