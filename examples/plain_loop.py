"""CLIP training in plain PyTorch + open_clip, with HELIP's online hard pairs added in five lines.

Everything here is an ordinary CLIP loop; the lines marked `# helip` are all that hard pairs need: a mining
session (one per run, bound to its namespace on the miner), a DataLoader whose batches put each anchor's mined hard
pair in the same batch, a push of each step's embeddings to the miner, and closing the session.

    helip-miner serve --dim 64 --port 50051 &          # dim: the model's embed_dim (helip-tiny: 64)
    python examples/plain_loop.py --train-data data/train.csv --miner 127.0.0.1:50051 --steps 200
"""

import argparse
import logging
import math
from pathlib import Path

import open_clip
import torch

import helip  # helip: the only import hard pairs need
from helip import CsvPairs  # map-style: dataset[i] -> (i, image, tokens); the id is what the miner stores

log = logging.getLogger("plain_loop")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-data", required=True, help="open_clip CSV: tab-separated, columns filepath, title")
    parser.add_argument("--miner", help="HOST:PORT of a running `helip-miner serve --dim <model embed_dim>`")
    parser.add_argument("--namespace", default="plain-loop", help="this run's namespace on the (shared) miner")
    parser.add_argument("--reset-namespace", action="store_true", help="drop it first if it holds other data")
    parser.add_argument(
        "--model",
        default="configs/models/helip-tiny.json",
        help="an open_clip model name, or the path of a JSON open_clip model config",
    )
    parser.add_argument("--pretrained", help="a local open_clip weights file (default: random init)")
    parser.add_argument("--loss", choices=("clip", "siglip"), default="clip", help="CLIP's softmax or SigLIP's sigmoid")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per batch: anchors + their hard pairs")
    parser.add_argument("--hard-ratio", type=float, default=0.5, help="share of each batch that is hard pairs")
    parser.add_argument(
        "--positive-ratio", type=float, default=0.0, help="the miner's false-negative guard, e.g. 0.9 (0: off)"
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="save the final state dict to this file")
    args = parser.parse_args(argv)
    if not args.miner:
        parser.error(
            "--miner HOST:PORT is required: start a miner first, e.g. `helip-miner serve --dim 64 "
            "--port 50051` (--dim = the model's embed_dim), then pass --miner 127.0.0.1:50051"
        )
    try:
        helip.MiningConfig(namespace=args.namespace)  # checks the name
    except ValueError as error:
        parser.error(f"--namespace: {error}")
    if args.pretrained and not Path(args.pretrained).is_file():
        parser.error(f"--pretrained must be a local weights file (nothing is downloaded), got {args.pretrained!r}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)

    # The model: a named open_clip architecture, or a JSON config registered under its file's stem.
    name = args.model
    if name.endswith(".json"):
        open_clip.add_model_config(name)
        name = Path(name).stem
    # SigLIP's loss learns a logit bias as well; open_clip_train --siglip starts it at -10 and the temperature at 10.
    siglip_init = {"init_logit_scale": math.log(10), "init_logit_bias": -10} if args.loss == "siglip" else {}
    model, preprocess, _ = open_clip.create_model_and_transforms(
        name, pretrained=args.pretrained, device=args.device, output_dict=True, **siglip_init
    )
    tokenizer = open_clip.get_tokenizer(name)
    dataset = CsvPairs(args.train_data, preprocess, tokenizer)

    with torch.no_grad():
        embed_dim = model.encode_text(tokenizer(["probe"]).to(args.device)).shape[-1]
    # helip: one session per run, bound to its namespace on the miner; start() claims it and checks the miner.
    session = helip.MiningSession(
        address=args.miner,
        namespace=args.namespace,
        reset_namespace=args.reset_namespace,
        positive_ratio=args.positive_ratio,
    )
    session.start(embed_dim, dataset)  # helip
    # helip: a DataLoader whose batches hold anchors and their mined hard pairs (workers load the images).
    loader = session.loader(
        dataset, args.batch_size, hard_ratio=args.hard_ratio, num_workers=args.workers, steps=args.steps
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    contrastive_loss = open_clip.loss.SigLipLoss() if args.loss == "siglip" else open_clip.ClipLoss()

    model.train()
    for step, batch in enumerate(loader):  # PairBatch(ids, images, tokens, layout)
        images = batch.images.to(args.device, non_blocking=True)
        tokens = batch.tokens.to(args.device, non_blocking=True)
        out = model(images, tokens)
        loss = contrastive_loss(**out)  # features, logit_scale (and SigLIP's logit_bias), as open_clip_train calls it
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip does
        session.push(batch.ids, out["image_features"], out["text_features"], step)  # helip: index in the background
        layout = batch.layout  # which rows are (anchor, hard pair) couples, and how many slots were mined
        log.info(
            "step %d loss %.4f hard fraction %.3f (%d hard, %d fallback)",
            step,
            loss.item(),
            layout.hard_fraction,
            layout.n_hard,
            layout.n_fallback,
        )

    session.close()  # helip: stops mining, sends the last pushes
    log.info("done: %d steps; mining %s", args.steps, session.counters.snapshot())
    if args.output:
        torch.save(model.state_dict(), args.output)
        log.info("saved the state dict to %s", args.output)


if __name__ == "__main__":  # needed: DataLoader workers start from a forkserver, which imports this file
    main()
