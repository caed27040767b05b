"""``vitadapter data``: list the datasets, write synthetic twins, prepare and validate shards.

Sub-commands::

    vitadapter data list
    vitadapter data synthesize DATASET --out DIR [--num-train N --num-val M --seed S ...]
    vitadapter data prepare DATASET --raw PATH --out DIR [--skip-corrupt --workers N ...]
    vitadapter data validate DIR [--decode-images]

The heavy imports (numpy, OpenCV, webdataset) happen inside the command functions.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("vitadapter.data")

DATASETS = ("ade20k", "coco_stuff164k", "pascal_context_59")
SPLITS = ("train", "val")


def _list(args: argparse.Namespace) -> int:
    from data.catalog import CATALOG

    for info in CATALOG.values():
        sizes = ", ".join(f"{split} {count:,}" for split, count in info.split_sizes.items())
        print(f"{info.name:<18} {info.num_classes:>3} classes  {sizes}  {info.title}")
        print(f"{'':<18} labels: {info.label_convention}")
    return 0


def _synthesize(args: argparse.Namespace) -> int:
    from data.synthetic import synthesize

    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    report = synthesize(
        args.dataset,
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        seed=args.seed,
        min_size=args.min_size,
        max_size=args.max_size,
        classes=classes,
        num_classes_used=args.num_classes_used,
        max_shapes=args.max_shapes,
        label_format=args.label_format,
        force=args.force,
    )
    log.info(
        "synthetic %s twin in %s: %s, %d classes; prepare it with "
        "`vitadapter data prepare %s --raw %s --out DIR`",
        report.dataset,
        report.root,
        report.counts,
        len(report.train_ids),
        report.dataset,
        report.root,
    )
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from data.prepare import prepare_dataset

    report = prepare_dataset(
        args.dataset,
        args.raw,
        args.out,
        splits=args.splits,
        skip_corrupt=args.skip_corrupt,
        samples_per_shard=args.samples_per_shard,
        limit=args.limit,
        workers=args.workers,
        force=args.force,
    )
    for split, index in report.index.splits.items():
        log.info(
            "%s %s: %d samples, %d shards, %d skipped as corrupt",
            args.dataset,
            split,
            index.num_samples,
            len(index.shards),
            len(index.skipped),
        )
    log.info("%s %s", report.root, "was already up to date" if report.reused else "written")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from data.shards import validate_prepared

    index = validate_prepared(args.dir, decode_images=args.decode_images)
    counts = ", ".join(f"{split} {s.num_samples}" for split, s in index.splits.items())
    log.info("%s: valid %s shards (%s)", args.dir, index.dataset, counts)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command and its sub-commands."""
    parser = subparsers.add_parser(
        "data",
        help="datasets: synthetic twins, shard preparation and validation",
        description=(
            "Datasets of the reproduction (ADE20K, COCO-Stuff-164k, Pascal Context 59): write synthetic twins "
            "in the official formats, turn an official download (or a twin) into validated webdataset shards, "
            "and validate prepared shards."
        ),
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")

    def _help(_: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_help)

    listing = actions.add_parser(
        "list", help="list the datasets, their classes, splits and label conventions"
    )
    listing.set_defaults(func=_list)

    synth = actions.add_parser(
        "synthesize",
        help="write a small synthetic twin of a dataset in its official format",
        description=(
            "Write a synthetic twin: same folder and file naming and raw label encoding as the official "
            "dataset, scenes of shapes whose classes each have their own colour and texture, deterministic "
            "by --seed. Its folder is the --raw of `vitadapter data prepare`."
        ),
    )
    synth.add_argument("dataset", choices=DATASETS, help="dataset to imitate")
    synth.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder to write the twin into: new, empty, or one vitadapter wrote (replaced)",
    )
    synth.add_argument(
        "--force", action="store_true", help="replace --out even if it holds files vitadapter did not write"
    )
    synth.add_argument("--num-train", type=int, default=16, help="training images (default 16)")
    synth.add_argument("--num-val", type=int, default=4, help="validation images (default 4)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument(
        "--min-size", type=int, default=256, help="smallest image side in pixels (default 256)"
    )
    synth.add_argument("--max-size", type=int, default=512, help="largest image side in pixels (default 512)")
    synth.add_argument(
        "--num-classes-used", type=int, default=None, help="draw only train ids 0..N-1 (default: all classes)"
    )
    synth.add_argument("--classes", default=None, help="comma-separated train ids to draw from (overrides N)")
    synth.add_argument("--max-shapes", type=int, default=6, help="most shapes per scene (default 6)")
    synth.add_argument(
        "--label-format",
        choices=("mat", "detail_json"),
        default="mat",
        help="pascal_context_59 only: PASCAL-Context trainval/*.mat files (default) or the Detail API's "
        "trainval_merged.json",
    )
    synth.set_defaults(func=_synthesize)

    prepare = actions.add_parser(
        "prepare",
        help="convert an official download (or a twin) into validated webdataset shards",
        description=(
            "Read DATASET under --raw (the downloaded archives, their extracted folders, or a synthetic twin), "
            "convert label maps to train ids (the reference's conventions), and write webdataset shards plus "
            "index.json into --out, atomically. Re-running with the same inputs is a no-op. When the dataset "
            "is missing, the error says which files to download and where to put them."
        ),
    )
    prepare.add_argument("dataset", choices=DATASETS, help="dataset to prepare")
    prepare.add_argument(
        "--raw", required=True, metavar="PATH", help="folder holding the downloaded archives or folders"
    )
    prepare.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder of shards and index.json: new, empty, or one vitadapter wrote (replaced); never "
        "inside --raw",
    )
    prepare.add_argument(
        "--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="splits to prepare"
    )
    prepare.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="skip corrupt images/labels (recorded in index.json) instead of stopping with an error",
    )
    prepare.add_argument(
        "--samples-per-shard", type=int, default=1000, help="samples per shard (default 1000)"
    )
    prepare.add_argument(
        "--limit", type=int, default=None, help="keep only the first N samples of each split"
    )
    prepare.add_argument(
        "--workers", type=int, default=0, help="reader processes (default 0: read in this process)"
    )
    prepare.add_argument(
        "--force",
        action="store_true",
        help="rebuild even if --out is complete and up to date, and replace an --out vitadapter did not write",
    )
    prepare.set_defaults(func=_prepare)

    validate = actions.add_parser(
        "validate",
        help="check a prepared folder: checksums, label ranges, counts and histograms",
        description="Fail (naming the file) on a missing or altered shard or a label outside the classes and 255.",
    )
    validate.add_argument("dir", metavar="DIR", help="prepared dataset folder")
    validate.add_argument("--decode-images", action="store_true", help="also decode every image")
    validate.set_defaults(func=_validate)
