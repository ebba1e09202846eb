"""Synthetic fine-grained captioned images, and a CSV -> webdataset shard converter (`helip-data`).

The synthetic set exists so that the whole pipeline (trainer, miner, eval) can be exercised offline in seconds.
Each image holds one or two flat-coloured shapes on a plain background; the caption names every attribute that
was drawn (size, texture, colour, shape and, for two objects, their spatial relation), so the caption determines
the image up to small jitter of position and size. A fraction of the samples are copies of an earlier scene with
exactly one attribute changed (or the two objects swapped), so the set contains genuinely hard pairs: captions
one word apart, or with the same bag of words in a different order.

Layout written by `generate` (all CSVs tab-separated, open_clip's format; `filepath` is RELATIVE to the
directory holding the CSV, i.e. the output root, so the set can be moved; pairs.data also accepts absolute paths):

    DIR/images/{train,test}_NNNNNN.png
    DIR/train.csv       filepath, title
    DIR/test.csv        filepath, title
    DIR/retrieval.csv   filepath, title          a test subset with unique captions
    DIR/zeroshot.csv    filepath, title, label   the single-object test images; label indexes classnames
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
from PIL import Image, ImageDraw

from helip.trainer.pairs.data import read_pairs

log = logging.getLogger(__name__)

# Palette chosen so that every pair of colours is far apart in RGB: a pixel can be classified back to its colour
# by nearest neighbour, which the consistency tests rely on.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
BACKGROUND = (25, 25, 25)
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
TEXTURES = ("solid", "striped", "dotted")
RELATIONS = ("left of", "right of", "above", "below")
# Object radius as a fraction of the image side (jittered by 5%); two large objects (with margins) must fit side by
# side, and the sizes must stay apart enough that "small" and "large" are never confused.
SIZE_RADIUS = {"small": 0.12, "large": 0.2}
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "an image of a {}.", "a {} shape.")
SEP = "\t"


@dataclass(frozen=True)
class SynthConfig:
    out_dir: Path
    train_size: int = 4000
    test_size: int = 600
    image_size: int = 32
    seed: int = 0
    single_object_fraction: float = 0.4
    # Fraction of samples derived from an earlier scene by changing one attribute: the built-in hard pairs.
    hard_variant_fraction: float = 0.3
    retrieval_size: int = 500


@dataclass(frozen=True)
class SynthPaths:
    root: Path
    images_dir: Path
    train_csv: Path
    test_csv: Path
    retrieval_csv: Path
    zeroshot_csv: Path
    zeroshot_json: Path


@dataclass(frozen=True)
class Obj:
    """One drawn object: its named attributes and its geometry in pixels (centre and radius)."""

    shape: str
    colour: str
    size: str
    texture: str
    cx: float = 0.0
    cy: float = 0.0
    radius: float = 0.0

    def phrase(self) -> str:
        return f"a {self.size} {self.texture} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """`objects[0]` is the main object; for two objects, `relation` says where objects[0] is relative to objects[1]."""

    objects: tuple[Obj, ...]
    relation: str | None = None

    def caption(self) -> str:
        if len(self.objects) == 1:
            return self.objects[0].phrase()
        first, second = self.objects
        return f"{first.phrase()} {self.relation} {second.phrase()}"

    def classname(self) -> str:
        return f"{self.objects[0].colour} {self.objects[0].shape}"


def classnames() -> list[str]:
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


# ---------------------------------------------------------------------------------------------------------------
# Sampling: attributes first, geometry last, so that a hard variant re-places its objects consistently.


def _random_obj(rng: np.random.Generator) -> Obj:
    return Obj(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        size=SIZES[rng.integers(len(SIZES))],
        texture=TEXTURES[rng.integers(len(TEXTURES))],
    )


def _mutate(scene: Scene, rng: np.random.Generator) -> Scene:
    """Change exactly one attribute of one object, or (two objects) the relation or the mention order."""
    objects = list(scene.objects)
    choices = ["shape", "colour", "size", "texture"] + (["relation", "swap"] if len(objects) == 2 else [])
    what = choices[rng.integers(len(choices))]
    if what == "relation":
        others = [r for r in RELATIONS if r != scene.relation]
        return Scene(tuple(objects), others[rng.integers(len(others))])
    if what == "swap":
        # Same words, different meaning: "A left of B" vs "B left of A".
        return Scene((objects[1], objects[0]), scene.relation)
    values = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES, "texture": TEXTURES}[what]
    index = int(rng.integers(len(objects)))
    current = getattr(objects[index], what)
    others = [v for v in values if v != current]
    objects[index] = dataclasses.replace(objects[index], **{what: others[rng.integers(len(others))]})
    return Scene(tuple(objects), scene.relation)


def _place(scene: Scene, image_size: int, rng: np.random.Generator) -> Scene:
    """Give every object a centre and radius consistent with its size and the scene's relation."""
    s = float(image_size)
    # The main object goes into the region its relation names; the second object into the opposite half.
    if len(scene.objects) == 1:
        regions = [(0.0, 0.0, s, s)]
    else:
        halves = {
            "left of": [(0, 0, s / 2, s), (s / 2, 0, s, s)],
            "right of": [(s / 2, 0, s, s), (0, 0, s / 2, s)],
            "above": [(0, 0, s, s / 2), (0, s / 2, s, s)],
            "below": [(0, s / 2, s, s), (0, 0, s, s / 2)],
        }
        regions = halves[scene.relation]
    placed = []
    for obj, (x0, y0, x1, y1) in zip(scene.objects, regions):
        radius = SIZE_RADIUS[obj.size] * s * rng.uniform(0.95, 1.05)
        margin = radius + 0.5
        cx = rng.uniform(x0 + margin, max(x0 + margin, x1 - margin))
        cy = rng.uniform(y0 + margin, max(y0 + margin, y1 - margin))
        placed.append(dataclasses.replace(obj, cx=cx, cy=cy, radius=radius))
    return Scene(tuple(placed), scene.relation)


def sample_scenes(n: int, config: SynthConfig, rng: np.random.Generator) -> list[Scene]:
    scenes: list[Scene] = []
    for _ in range(n):
        if scenes and rng.random() < config.hard_variant_fraction:
            base = _mutate(scenes[int(rng.integers(len(scenes)))], rng)
        elif rng.random() < config.single_object_fraction:
            base = Scene((_random_obj(rng),))
        else:
            base = Scene((_random_obj(rng), _random_obj(rng)), RELATIONS[rng.integers(len(RELATIONS))])
        scenes.append(_place(base, config.image_size, rng))
    return scenes


# ---------------------------------------------------------------------------------------------------------------
# Rendering. No anti-aliasing: every pixel is either the background or exactly one palette colour.


def _shape_mask(obj: Obj, image_size: int) -> np.ndarray:
    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = obj.cx, obj.cy, obj.radius
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif obj.shape == "square":
        h = r * 0.9  # close to the circle's area, yet a large square stays visibly larger than a small circle
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=255)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    return np.asarray(canvas) > 0


def _texture_mask(obj: Obj, shape: np.ndarray, image_size: int) -> np.ndarray:
    """Pixels of the object to paint: the outline always (so the shape stays legible), the interior by texture."""
    if obj.texture == "solid":
        return shape
    interior = shape.copy()
    interior[1:, :] &= shape[:-1, :]
    interior[:-1, :] &= shape[1:, :]
    interior[:, 1:] &= shape[:, :-1]
    interior[:, :-1] &= shape[:, 1:]
    outline = shape & ~interior
    unit = max(1, image_size // 32)  # keep the pattern's period proportional to the image
    y, x = np.mgrid[0:image_size, 0:image_size] // unit
    if obj.texture == "striped":
        pattern = ((x + y) // 2) % 2 == 0  # diagonal, so stripes never look like a square's edges
    elif obj.texture == "dotted":
        pattern = (x % 3 == 1) & (y % 3 == 1)
    else:
        raise ValueError(f"unknown texture {obj.texture!r}")
    return outline | (interior & pattern)


def render(scene: Scene, image_size: int) -> Image.Image:
    pixels = np.empty((image_size, image_size, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    for obj in scene.objects:
        mask = _texture_mask(obj, _shape_mask(obj, image_size), image_size)
        pixels[mask] = COLOURS[obj.colour]
    return Image.fromarray(pixels, "RGB")


# ---------------------------------------------------------------------------------------------------------------
# Writing.


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=SEP, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_split(name: str, scenes: list[Scene], paths: SynthPaths, image_size: int) -> list[list[object]]:
    rows: list[list[object]] = []
    for i, scene in enumerate(scenes):
        relative = f"{paths.images_dir.name}/{name}_{i:06d}.png"
        render(scene, image_size).save(paths.root / relative, optimize=False)
        rows.append([relative, scene.caption()])
    return rows


def generate(config: SynthConfig) -> SynthPaths:
    """Write the synthetic set under `config.out_dir` (layout in the module docstring); same seed, same bytes."""
    if config.image_size < 16:
        raise ValueError(f"image_size must be >= 16 to draw two objects side by side, got {config.image_size}")
    if config.train_size < 1 or config.test_size < 1:
        raise ValueError(f"train_size and test_size must be >= 1, got {config.train_size}, {config.test_size}")
    root = Path(config.out_dir)
    paths = SynthPaths(
        root=root,
        images_dir=root / "images",
        train_csv=root / "train.csv",
        test_csv=root / "test.csv",
        retrieval_csv=root / "retrieval.csv",
        zeroshot_csv=root / "zeroshot.csv",
        zeroshot_json=root / "zeroshot.json",
    )
    paths.images_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # One independent stream per split: changing --test does not change the training set.
    train_scenes = sample_scenes(config.train_size, config, np.random.default_rng([config.seed, 0]))
    test_scenes = sample_scenes(config.test_size, config, np.random.default_rng([config.seed, 1]))
    train_rows = _write_split("train", train_scenes, paths, config.image_size)
    test_rows = _write_split("test", test_scenes, paths, config.image_size)
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

    # Zero-shot classes name the main object; only single-object images have an unambiguous class.
    names = classnames()
    zeroshot_rows = [
        [row[0], row[1], names.index(scene.classname())]
        for row, scene in zip(test_rows, test_scenes)
        if len(scene.objects) == 1
    ]
    _write_csv(paths.zeroshot_csv, ["filepath", "title", "label"], zeroshot_rows)
    task = {
        "classnames": names,
        "templates": list(TEMPLATES),
        "samples": paths.zeroshot_csv.name,
        "label_key": "label",
    }
    paths.zeroshot_json.write_text(json.dumps(task, indent=2) + "\n", encoding="utf-8")
    log.info(
        "synth: %d train, %d test, %d retrieval, %d zero-shot samples in %s (%.1f s)",
        len(train_rows),
        len(test_rows),
        len(retrieval_rows),
        len(zeroshot_rows),
        root,
        time.perf_counter() - started,
    )
    return paths


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
        if args.image_size < 16:
            parser.error(f"argument --image-size: must be >= 16, got {args.image_size}")
        paths = generate(SynthConfig(args.out, args.train, args.test, args.image_size, args.seed))
        print(json.dumps({k: str(v) for k, v in dataclasses.asdict(paths).items()}, indent=2))
    else:
        shards = write_shards(args.csv, args.out, args.shard_size)
        print(json.dumps({"shards": [str(s) for s in shards]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
