"""The `helip-inspect` command: argv -> data set, pairs (from a model or a running miner) -> HTML page + PNG grid.

    helip-inspect --data DIR_OR_CSV [--model M.json] [--checkpoint CK.pt | --miner HOST:PORT]
                  [--anchors N --seed S | --ids 3,14,15] [--k K] [--out DIR] [--positive-ratio R [R ...]]

writes OUT/index.html (self-contained), OUT/grid.png and OUT/pairs.json, and prints their paths as JSON.
With --positive-ratio the pairs the miner's false-negative guard would drop at the first R are marked, each pair
shows its caption fit, and every R given is counted (logged as a table) so that a ratio can be chosen by looking.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from helip.trainer.pairs.data import BadSampleError, PairDataset, open_pairs
from helip.trainer.tools.inspector import (
    AnchorPairs,
    FalseNegativeRule,
    guard_counts,
    guard_table,
    mine_embeddings,
    mine_miner,
)
from helip.trainer.tools.synth import positive_int

log = logging.getLogger(__name__)

DEFAULT_MODEL = "configs/models/helip-tiny.json"
PLACEHOLDER_GREY = (128, 128, 128)


@torch.no_grad()
def embed_dataset(
    model,
    dataset: PairDataset,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [n] int64, image [n, dim], text [n, dim]) float32, L2-normalised, of every usable sample.

    A bad sample is replaced by a substitute inside the data set; only the substitute's own row is kept, so a bad
    id simply has no row (and is logged)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from helip.trainer.pairs.bootstrap import encode_pairs
    from helip.trainer.pairs.data import collate_pairs

    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_pairs, num_workers=num_workers
    )
    was_training = model.training
    model.eval()
    ids, images, texts, bad = [], [], [], set()
    try:
        for batch in tqdm(loader, desc="embed data set", unit="batch", disable=not progress):
            image, text = encode_pairs(model, batch.images.to(device), batch.tokens.to(device))
            ids.append(batch.ids.numpy())
            images.append(torch.nn.functional.normalize(image.float(), dim=-1).cpu().numpy())
            texts.append(torch.nn.functional.normalize(text.float(), dim=-1).cpu().numpy())
            bad.update(sample.id for sample in batch.skipped)
    finally:
        model.train(was_training)
    all_ids = np.concatenate(ids)
    # A substitute may appear twice (for itself and for a bad id): keep one row per id.
    all_ids, first = np.unique(all_ids, return_index=True)
    if bad:
        log.warning("%d bad samples have no row: %s", len(bad), sorted(bad)[:20])
    return all_ids, np.concatenate(images)[first], np.concatenate(texts)[first]


def image_of(dataset: PairDataset, thumb_px: int):
    """id -> PIL image; a sample that cannot be read shows as a grey square."""

    def load(sample_id: int) -> Image.Image:
        try:
            return dataset.load(sample_id)[0]
        except BadSampleError as error:
            log.warning("sample %d: %s", sample_id, error)
            return Image.new("RGB", (thumb_px, thumb_px), PLACEHOLDER_GREY)

    return load


def caption_of(dataset: PairDataset):
    def caption(sample_id: int) -> str:
        try:
            return dataset.caption(sample_id)
        except (OSError, UnicodeDecodeError) as error:
            return f"(unreadable caption: {error})"

    return caption


def pick_anchors(n_samples: int, count: int, seed: int) -> list[int]:
    """`count` distinct ids of [0, n_samples), drawn with `seed`, in increasing order."""
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_samples, size=count, replace=False))


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _id_list(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integer ids, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("names no ids")
    if min(ids) < 0:
        raise argparse.ArgumentTypeError(f"ids must be >= 0, got {min(ids)}")
    if len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError("names an id twice")
    return ids


def _ratio(text: str) -> float:
    try:
        ratio = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < ratio <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return ratio


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="helip-inspect", description="hard pairs as an HTML page and a PNG grid")
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="a .csv/.tsv pair file, .tar shards, or a directory written by `helip-data synth` (its train.csv)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, help="weights for --model; embed and mine in-process")
    source.add_argument("--miner", help="HOST:PORT of a running miner whose rows are this data set's ids")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model config .json or open_clip name (in-process)")
    parser.add_argument("--token-file", default="", help="bearer token for --miner (else $HELIP_AUTH_TOKEN)")
    parser.add_argument(
        "--namespace",
        default="",
        help="the miner namespace holding the rows (helip-train's: its output dir name; default: 'default')",
    )
    anchors = parser.add_mutually_exclusive_group()
    anchors.add_argument("--anchors", type=positive_int, default=8, help="how many anchors to draw")
    anchors.add_argument("--ids", type=_id_list, help="comma-separated anchor ids instead of a draw")
    parser.add_argument("--seed", type=int, default=0, help="seed of the anchor draw")
    parser.add_argument("--k", type=positive_int, default=5, help="pairs shown per anchor")
    parser.add_argument("--out", type=Path, default=Path("runs/inspect"), help="output directory")
    parser.add_argument(
        "--max-similarity",
        type=float,
        default=FalseNegativeRule.max_similarity,
        help="near-duplicate cut of the mining (>= 1: off)",
    )
    parser.add_argument(
        "--caption-similarity",
        type=float,
        default=FalseNegativeRule.caption_similarity,
        help="word-sequence likeness from which captions count as the same",
    )
    parser.add_argument(
        "--cut-margin",
        type=float,
        default=FalseNegativeRule.cut_margin,
        help="a similarity this close to --max-similarity is flagged",
    )
    parser.add_argument(
        "--positive-ratio",
        type=_ratio,
        nargs="+",
        default=[],
        metavar="R",
        help="mark the pairs the miner's false-negative guard drops at the first R (a Mine's positive_ratio) and "
        "show what a guarded Mine returns; more R: count each's drops in a table",
    )
    parser.add_argument("--thumb", type=positive_int, default=96, help="thumbnail side in pixels")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for embedding")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _open_dataset(parser: argparse.ArgumentParser, path: Path, transform, tokenize) -> PairDataset:
    spec = path / "train.csv" if path.is_dir() else path
    if not spec.exists() and "{" not in str(spec):
        parser.error(f"argument --data: {spec} does not exist")
    try:
        dataset = open_pairs(str(spec), transform, tokenize)
    except (ValueError, OSError) as error:
        parser.error(f"argument --data: {error}")
    if len(dataset) == 0:
        parser.error(f"argument --data: {spec} holds no samples")
    return dataset


def _rule(parser: argparse.ArgumentParser, args: argparse.Namespace) -> FalseNegativeRule:
    try:
        return FalseNegativeRule(args.caption_similarity, args.max_similarity, args.cut_margin)
    except ValueError as error:
        flag = str(error).split(" ")[0].split(".")[-1].replace("_", "-")
        parser.error(f"argument --{flag}: {error}")


def _anchor_ids(parser: argparse.ArgumentParser, args: argparse.Namespace, n_samples: int) -> list[int]:
    if args.ids is not None:
        outside = [i for i in args.ids if i >= n_samples]
        if outside:
            parser.error(f"argument --ids: {outside} outside the data set's ids [0, {n_samples})")
        return args.ids
    if args.anchors > n_samples:
        parser.error(f"argument --anchors: {args.anchors} anchors asked of a data set of {n_samples} samples")
    return pick_anchors(n_samples, args.anchors, args.seed)


def _in_process(parser, args, rule, dataset: PairDataset, anchor_ids: list[int]) -> tuple[list[AnchorPairs], str]:
    from helip.trainer.tools import model as models

    try:
        model, _, transform, tokenize = models.build_model(models.ModelConfig(name=args.model, device=args.device))
    except (ValueError, FileNotFoundError) as error:
        parser.error(f"argument --model: {error}")
    step = 0
    if args.checkpoint is not None:
        if not args.checkpoint.is_file():
            parser.error(f"argument --checkpoint: {args.checkpoint} is not a file")
        try:
            step = int(models.load_checkpoint(model, args.checkpoint).get("step", 0))
        except (ValueError, RuntimeError) as error:
            parser.error(f"argument --checkpoint: {error}")
    # The data set was opened before the (slow) model build so that bad flags fail fast; it gets the model's
    # preprocessing now.
    dataset.transform, dataset.tokenize = transform, tokenize
    ids, image, text = embed_dataset(
        model,
        dataset,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        progress=not args.no_progress,
    )
    ratio = args.positive_ratio[0] if args.positive_ratio else 0.0
    pairs = mine_embeddings(
        image, text, ids, anchor_ids, args.k, caption_of(dataset), rule, step, args.device, positive_ratio=ratio
    )
    weights = f"checkpoint {args.checkpoint} (step {step})" if args.checkpoint else "random weights"
    return pairs, f"{args.model}, {weights}, mined in-process over {len(ids)} rows of {args.data}"


def _from_miner(parser, args, rule, dataset: PairDataset, anchor_ids: list[int]) -> tuple[list[AnchorPairs], str]:
    import grpc

    from helip.miner_service.client.single import ClientConfig, MinerClient
    from helip.miner_service.core.errors import InvalidArgument
    from helip.miner_service.wire.names import validate_name

    try:
        namespace = validate_name(args.namespace, "--namespace")
    except InvalidArgument as error:
        parser.error(f"argument {error}")
    client = MinerClient(ClientConfig.with_token_from(args.token_file, address=args.miner, namespace=namespace))
    try:
        client.wait_ready(10.0)
        size = client.stats().size
        ratio = args.positive_ratio[0] if args.positive_ratio else 0.0
        pairs = mine_miner(client, anchor_ids, args.k, caption_of(dataset), rule, positive_ratio=ratio)
    except grpc.FutureTimeoutError:
        parser.error(f"argument --miner: no miner answered at {args.miner} within 10 s")
    except grpc.RpcError as error:
        parser.error(f"argument --miner: {args.miner} answered {error.code().name}: {error.details()}")
    finally:
        client.close()
    outside = sorted({p.id for a in pairs for p in a.pairs if p.id >= len(dataset)})
    if outside:
        parser.error(f"argument --miner: rows {outside[:10]} are not ids of {args.data} (another data set?)")
    return pairs, f"miner {args.miner} ({size} rows), data {args.data}"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workers < 0:
        parser.error(f"argument --workers: must be >= 0, got {args.workers}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"argument --device: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: {args.device} asked for but no CUDA device is visible")
    rule = _rule(parser, args)
    # Captions and raw images need no model; the in-process path attaches the model's preprocessing later.
    dataset = _open_dataset(parser, args.data, None, None)
    anchor_ids = _anchor_ids(parser, args, len(dataset))
    pairs, source = (_from_miner if args.miner else _in_process)(parser, args, rule, dataset, anchor_ids)

    from helip.trainer.tools.inspector_page import GridLayout, render_grid, render_html

    load_image = image_of(dataset, args.thumb)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {"html": args.out / "index.html", "grid": args.out / "grid.png", "pairs": args.out / "pairs.json"}
    page = render_html(
        pairs, load_image, source=source, rule=rule, thumb_px=args.thumb, compare_ratios=args.positive_ratio[1:]
    )
    paths["html"].write_text(page, encoding="utf-8")
    render_grid(pairs, load_image, args.k, GridLayout(thumb_px=args.thumb)).save(paths["grid"])
    paths["pairs"].write_text(json.dumps([dataclasses.asdict(a) for a in pairs], indent=1) + "\n", encoding="utf-8")
    flagged = sum(p.likely_false_negative for a in pairs for p in a.pairs)
    log.info(
        "%d anchors, %d pairs, %d flagged as likely false negatives",
        len(pairs),
        sum(len(a.pairs) for a in pairs),
        flagged,
    )
    if args.positive_ratio:
        counts = guard_counts(pairs, args.positive_ratio)
        log.info("%s", counts[0].summary())
        if len(counts) > 1:
            log.info("the guard at each ratio asked:\n%s", guard_table(counts))
    print(json.dumps({name: str(path) for name, path in paths.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
