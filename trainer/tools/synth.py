"""Synthetic captioned images in several data families, and a CSV -> webdataset shard converter (`helip-data`).

The synthetic sets exist so that the whole pipeline (trainer, miner, eval) can be exercised offline in seconds, and
so that a default measured on one of them can be measured again on others. Every family (synth_families: shapes,
counts, textures, words) captions each image by everything its images differ in, so the caption determines the
image up to small jitter; a fraction of the samples are copies of an earlier scene with exactly one attribute
changed (or two subjects swapped), so every set contains genuinely hard pairs: captions one word apart, or with the
same bag of words in a different order. Every family has a zero-shot task over the images of a single subject.

Layout written by `generate`, the same for every family (all CSVs tab-separated, open_clip's format; `filepath` is
RELATIVE to the directory holding the CSV, i.e. the output root, so the set can be moved; pairs.data also accepts
absolute paths):

    DIR/images/{train,test}_NNNNNN.png (.jpg with --format jpg)
    DIR/train.csv       filepath, title
    DIR/test.csv        filepath, title
    DIR/retrieval.csv   filepath, title          a test subset with unique captions
    DIR/zeroshot.csv    filepath, title, label   the single-subject test images; label indexes classnames
    DIR/zeroshot.json   {"classnames": [...], "templates": [...], "samples": "zeroshot.csv", "label_key": "label"}
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from helip.trainer.pairs.data import read_pairs
from helip.trainer.tools.synth_families import DEFAULT_FAMILY, FAMILIES, family
from helip.trainer.tools.synth_families.base import Captioned
from helip.trainer.tools.synth_families.draw import BACKGROUND, COLOURS
from helip.trainer.tools.synth_families.shapes import SHAPES, Obj, Scene, render

log = logging.getLogger(__name__)

SEP = "\t"
# The shapes family's names, where they were before the families had modules of their own.
__all__ = [
    "BACKGROUND",
    "COLOURS",
    "SHAPES",
    "Obj",
    "Scene",
    "SynthConfig",
    "SynthPaths",
    "check_family",
    "ensure_generated",
    "generate",
    "main",
    "positive_int",
    "render",
    "set_family",
    "write_shards",
]


IMAGE_FORMATS = ("png", "jpg")


@dataclass(frozen=True)
class SynthConfig:
    out_dir: Path
    train_size: int = 4000
    test_size: int = 600
    image_size: int = 32
    seed: int = 0
    # Fraction of fresh scenes with a single subject (object, group, texture, word): the zero-shot images.
    single_object_fraction: float = 0.4
    # Fraction of samples derived from an earlier scene by changing one attribute: the built-in hard pairs.
    hard_variant_fraction: float = 0.3
    retrieval_size: int = 500
    family: str = DEFAULT_FAMILY  # which synth_families module draws the scenes
    image_format: str = "png"  # "png" (lossless: the benchmarks' sets) or "jpg" (quality 90: decoding as web data does)

    def __post_init__(self):
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        smallest = family(self.family).min_image_size
        if self.image_size < smallest:
            raise ValueError(f"image_size must be >= {smallest} for the {self.family} family, got {self.image_size}")
        if self.train_size < 1 or self.test_size < 1:
            raise ValueError(f"train_size and test_size must be >= 1, got {self.train_size}, {self.test_size}")


@dataclass(frozen=True)
class SynthPaths:
    root: Path
    images_dir: Path
    train_csv: Path
    test_csv: Path
    retrieval_csv: Path
    zeroshot_csv: Path
    zeroshot_json: Path

    @classmethod
    def under(cls, root: str | Path) -> SynthPaths:
        root = Path(root)
        return cls(
            root=root,
            images_dir=root / "images",
            train_csv=root / "train.csv",
            test_csv=root / "test.csv",
            retrieval_csv=root / "retrieval.csv",
            zeroshot_csv=root / "zeroshot.csv",
            zeroshot_json=root / "zeroshot.json",
        )


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=SEP, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_split(name: str, scenes: list[Captioned], paths: SynthPaths, config: SynthConfig) -> list[list[object]]:
    rows: list[list[object]] = []
    draw = family(config.family).render
    # disable=None: a bar on a terminal only, so logs of tests and benchmarks stay clean
    for i, scene in enumerate(tqdm(scenes, desc=f"synth {name}", unit="img", leave=False, disable=None)):
        relative = f"{paths.images_dir.name}/{name}_{i:06d}.{config.image_format}"
        image = draw(scene, config.image_size)
        if config.image_format == "jpg":
            image.convert("RGB").save(paths.root / relative, quality=90)
        else:
            image.save(paths.root / relative, optimize=False)
        rows.append([relative, scene.caption()])
    return rows


def generate(config: SynthConfig) -> SynthPaths:
    """Write the synthetic set of `config.family` under `config.out_dir` (layout in the module docstring); same seed and
    family, same bytes."""
    kind = family(config.family)
    paths = SynthPaths.under(config.out_dir)
    paths.images_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # One independent stream per split: changing --test does not change the training set.
    train_scenes, test_scenes = (
        kind.sample_scenes(
            size,
            np.random.default_rng([config.seed, split]),
            image_size=config.image_size,
            single_fraction=config.single_object_fraction,
            hard_fraction=config.hard_variant_fraction,
        )
        for split, size in enumerate((config.train_size, config.test_size))
    )
    train_rows = _write_split("train", train_scenes, paths, config)
    test_rows = _write_split("test", test_scenes, paths, config)
    _write_csv(paths.train_csv, ["filepath", "title"], train_rows)
    _write_csv(paths.test_csv, ["filepath", "title"], test_rows)

    # Retrieval needs one true caption per image: a repeated caption would make the ground truth ambiguous.
    seen: set[str] = set()
    retrieval_rows = []
    for row in test_rows:
        if row[1] not in seen and len(retrieval_rows) < config.retrieval_size:
            seen.add(row[1])
            retrieval_rows.append(row)
    _write_csv(paths.retrieval_csv, ["filepath", "title"], retrieval_rows)

    # Only single-subject images have an unambiguous class (classname() is None for the others).
    names = list(kind.classnames)
    zeroshot_rows = [
        [row[0], row[1], names.index(scene.classname())]
        for row, scene in zip(test_rows, test_scenes)
        if scene.classname() is not None
    ]
    _write_csv(paths.zeroshot_csv, ["filepath", "title", "label"], zeroshot_rows)
    task = {
        "classnames": names,
        "templates": list(kind.templates),
        "samples": paths.zeroshot_csv.name,
        "label_key": "label",
    }
    paths.zeroshot_json.write_text(json.dumps(task, indent=2) + "\n", encoding="utf-8")
    log.info(
        "synth %s: %d train, %d test, %d retrieval, %d zero-shot samples in %s (%.1f s)",
        config.family,
        len(train_rows),
        len(test_rows),
        len(retrieval_rows),
        len(zeroshot_rows),
        paths.root,
        time.perf_counter() - started,
    )
    return paths


def set_family(root: str | Path) -> str | None:
    """The family of the set already under `root`, told by its zero-shot class names; None when it is none of ours."""
    task = SynthPaths.under(root).zeroshot_json
    if not task.is_file():
        return None
    names = tuple(json.loads(task.read_text(encoding="utf-8")).get("classnames", ()))
    return next((name for name in FAMILIES if family(name).classnames == names), None)


def check_family(root: str | Path, name: str) -> None:
    """Raise a ValueError if `root` holds a set of another family than `name`: a run asking for one family must
    never train on another."""
    found = set_family(root)
    if found is not None and found != name:
        raise ValueError(f"{root} holds the {found} set, not {name}: give each family its own directory")


def ensure_generated(config: SynthConfig) -> SynthPaths:
    """The set under `config.out_dir`, generated unless it is there (then checked to be of `config.family`)."""
    paths = SynthPaths.under(config.out_dir)
    if paths.train_csv.exists():
        check_family(paths.root, config.family)
        return paths
    log.info("generating the %s set in %s", config.family, paths.root)
    return generate(config)


def write_shards(
    csv_path: str | Path,
    out_dir: str | Path,
    shard_size: int,
    img_key: str = "filepath",
    caption_key: str = "title",
    sep: str = SEP,
) -> list[Path]:
    """Convert a CSV pair set to webdataset shards `out_dir/shard-NNNNNN.tar`, preserving row order.

    Sample k (the CSV's row k) gets the key `%09d % k` and members key.png|.jpg (the original bytes), key.txt (the
    caption) and key.id (k as text). Tar headers carry no time or owner, so the same CSV gives the same bytes.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    pairs = read_pairs(csv_path, img_key=img_key, caption_key=caption_key, sep=sep)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    for start in range(0, len(pairs), shard_size):
        shard = out / f"shard-{len(shards):06d}.tar"
        with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for k in range(start, min(start + shard_size, len(pairs))):
                image_path, caption = pairs[k]
                suffix = image_path.suffix.lower().lstrip(".")
                key = f"{k:09d}"
                for name, data in (
                    (f"{key}.{suffix}", image_path.read_bytes()),
                    (f"{key}.txt", caption.encode("utf-8")),
                    (f"{key}.id", str(k).encode("ascii")),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(shard)
    log.info("wds: %d samples in %d shards under %s", len(pairs), len(shards), out)
    return shards


# ---------------------------------------------------------------------------------------------------------------
# CLI.


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="helip-data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="generate the synthetic captioned image set")
    synth.add_argument("--out", type=Path, required=True, help="output directory")
    synth.add_argument("--train", type=positive_int, default=SynthConfig.train_size, help="training samples")
    synth.add_argument("--test", type=positive_int, default=SynthConfig.test_size, help="test samples")
    synth.add_argument("--image-size", type=positive_int, default=SynthConfig.image_size, help="pixels a side")
    synth.add_argument("--seed", type=int, default=SynthConfig.seed)
    synth.add_argument(
        "--family",
        choices=FAMILIES,
        default=DEFAULT_FAMILY,
        help="what the images show (docs/BENCHMARKS.md, Data families)",
    )
    synth.add_argument("--format", choices=IMAGE_FORMATS, default="png", help="image files: png or jpg (quality 90)")
    wds = commands.add_parser("wds", help="convert a CSV pair set to webdataset .tar shards")
    wds.add_argument("--csv", type=Path, required=True, help="tab-separated CSV with filepath and title columns")
    wds.add_argument("--out", type=Path, required=True, help="output directory for shard-NNNNNN.tar")
    wds.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "synth":
        smallest = family(args.family).min_image_size
        if args.image_size < smallest:
            parser.error(
                f"argument --image-size: must be >= {smallest} for --family {args.family}, got {args.image_size}"
            )
        config = SynthConfig(args.out, args.train, args.test, args.image_size, args.seed, family=args.family)
        paths = generate(dataclasses.replace(config, image_format=args.format))
        print(json.dumps({k: str(v) for k, v in dataclasses.asdict(paths).items()}, indent=2))
    else:
        shards = write_shards(args.csv, args.out, args.shard_size)
        print(json.dumps({"shards": [str(s) for s in shards]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
