"""``vitadapter data``: list the datasets, write synthetic twins, prepare and validate shards.

Sub-commands::

    vitadapter data list
    vitadapter data init DIR --out CARD [--name NAME --val-fraction F]
    vitadapter data synthesize DATASET --out DIR [--num-train N --num-val M --seed S ...]
    vitadapter data prepare DATASET --raw PATH --out DIR [--skip-corrupt --workers N ...]
    vitadapter data prepare --card CARD --out DIR [--skip-unpaired --skip-corrupt ...]
    vitadapter data validate DIR [--decode-images]

The heavy imports (numpy, OpenCV, webdataset) happen inside the command functions.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

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


def _init(args: argparse.Namespace) -> int:
    from data.atomic import write_text_atomic
    from data.card_init import card_text, default_name, scan_folder
    from data.catalog import check_dataset_name

    out = Path(args.out)
    name = check_dataset_name(args.name or default_name(Path(args.dir)), where="--name")
    draft = scan_folder(
        args.dir, val_fraction=args.val_fraction, seed=args.seed, progress=not args.no_progress
    )
    text, lists = card_text(draft, out, name=name)
    existing = [p for p in (out, *lists) if p.exists()]
    if existing and not args.force:
        raise ValueError(
            f"{existing[0]} exists: refusing to replace it (choose another --out, or --force to replace it)"
        )
    for line in draft.summary_lines():
        print(line)
    for path, listing in lists.items():
        write_text_atomic(path, listing)
        print(f"wrote {path} ({len(listing.splitlines())} stems)")
    write_text_atomic(out, text)
    print(f"wrote {out}: edit the class names and check `labels`, then")
    print(f"  vitadapter data prepare --card {out} --out artifacts/data/{name}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    if (args.card is None) == (args.dataset is None):
        raise ValueError("vitadapter data prepare: give a DATASET with --raw, or --card CARD (your own data)")
    if args.card is not None:
        if args.raw:
            raise ValueError("vitadapter data prepare --card: the card says where the files are; drop --raw")
        from data.prepare_card import prepare_card

        report = prepare_card(
            args.card,
            args.out,
            splits=args.splits,
            skip_unpaired=args.skip_unpaired,
            skip_corrupt=args.skip_corrupt,
            samples_per_shard=args.samples_per_shard,
            limit=args.limit,
            workers=args.workers,
            force=args.force,
        )
    else:
        if not args.raw:
            raise ValueError(
                f"vitadapter data prepare {args.dataset}: --raw PATH (the official download) is required"
            )
        if args.skip_unpaired:
            raise ValueError("--skip-unpaired applies to a dataset card (--card)")
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
            "%s %s: %d samples, %d shards, %d skipped",
            report.index.dataset,
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
            "and validate prepared shards. Your own data: `data init DIR --out CARD` writes a dataset card for a "
            "folder of images and label maps, `data prepare --card CARD --out DIR` its shards."
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

    init = actions.add_parser(
        "init",
        help="scan a folder of images and label maps and write a dataset card for it",
        description=(
            "Scan DIR (ADE20K's images/{training,validation} + annotations/..., mmsegmentation's img_dir/{train,val} "
            "+ ann_dir/..., or images/ beside labels/ or masks/, of which a train/val split is made as list files "
            "beside the card), read every label map once, and write a dataset card: the splits and suffixes found, "
            "the label values with their pixel share, a guessed `labels` rule with the reason, and placeholder "
            "class names to edit. Prints pairs per split, files without a partner, label modes and size "
            "mismatches. Then: vitadapter data prepare --card CARD --out DIR."
        ),
    )
    init.add_argument("dir", metavar="DIR", help="the dataset folder")
    init.add_argument("--out", required=True, metavar="CARD", help="the card file to write (YAML)")
    init.add_argument("--name", help="the dataset's name (default: DIR's name)")
    init.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of the pairs put into val when DIR has no split (default 0.2)",
    )
    init.add_argument("--seed", type=int, default=0, help="shuffle of that split (default 0)")
    init.add_argument("--force", action="store_true", help="replace an existing card (and list files)")
    init.add_argument("--no-progress", action="store_true", help="no progress bar")
    init.set_defaults(func=_init)

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
            "is missing, the error says which files to download and where to put them. With --card CARD your "
            "own data is read and converted as the card says; a label value it does not map, an RGB mask without "
            "an RGB map, a label map of another size than its image or a split without a pair is an error naming "
            "the file, and so are files without a partner unless --skip-unpaired."
        ),
    )
    prepare.add_argument(
        "dataset",
        nargs="?",
        choices=DATASETS,
        help="built-in dataset to prepare (or --card for your own data)",
    )
    prepare.add_argument("--raw", metavar="PATH", help="folder holding the downloaded archives or folders")
    prepare.add_argument(
        "--card",
        metavar="CARD",
        help="a dataset card (vitadapter data init): your own images and label maps, converted by its label rule",
    )
    prepare.add_argument(
        "--skip-unpaired",
        action="store_true",
        help="--card: skip images without a label map and label maps without an image (named in the log and "
        "recorded in index.json) instead of stopping with an error",
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
