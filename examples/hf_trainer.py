"""CLIP (or SigLIP) training with the Hugging Face Trainer, with HELIP's online hard pairs added in five lines.

An ordinary `transformers.Trainer` run of a CLIPModel or SiglipModel; the lines marked `# helip` are all that hard
pairs need: a data set of (id, image, caption) by sample id, a mining session (one per process, bound to its
namespace on the miner), `helip.HardPairTrainer` in place of `transformers.Trainer` (its DataLoader puts each
anchor's mined hard pair in the same batch, its loss is CLIP's or SigLIP's, and each optimizer step's embeddings go
to the miner), and closing the session. Checkpoints, resume (`--resume`), gradient accumulation and torchrun work
as with any Trainer.

Nothing is downloaded: the model is a tiny random one (`--model clip` or `siglip`), and its tokenizer a word-level
one built from the training captions (a real run loads its processor and weights with `from_pretrained`).

    helip-miner serve --dim 32 --port 50051 &          # dim: the tiny models' embedding width
    python examples/hf_trainer.py --train-data data/train.csv --miner 127.0.0.1:50051 --output-dir runs/hf
"""

import argparse
import json
import logging

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import helip  # helip: the only import hard pairs need

log = logging.getLogger("hf_trainer")

EMBED_DIM = 32  # the tiny models' embedding width: the miner's --dim
IMAGE_SIZE = 32  # helip-data's images
MAX_TEXT = 24  # tokens per caption, with its start and end tokens
SPECIAL = ["<pad>", "<unk>", "<start>", "<end>"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-data", required=True, help="open_clip CSV: tab-separated, columns filepath, title")
    parser.add_argument("--miner", help="HOST:PORT of a running `helip-miner serve --dim 32`")
    parser.add_argument("--namespace", default="hf-trainer", help="this run's namespace on the (shared) miner")
    parser.add_argument("--reset-namespace", action="store_true", help="drop it first if it holds other data")
    parser.add_argument("--model", choices=("clip", "siglip"), default="clip")
    parser.add_argument("--output-dir", required=True, help="the Trainer's output_dir (checkpoints, final model)")
    parser.add_argument("--max-steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--epochs", type=float, help="train this many epochs of the data set instead of --max-steps")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per micro-batch: anchors + hard pairs")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--hard-ratio", type=float, default=0.5, help="share of each batch that is hard pairs")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (per process)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--save-steps", type=int, default=0, help="a checkpoint every N optimizer steps (0: none)")
    parser.add_argument("--resume", help="resume from this checkpoint directory, or 'latest' in --output-dir")
    parser.add_argument(
        "--max-similarity",
        type=float,
        default=0.0,
        help="the miner's near-duplicate cut: candidates more similar than this are dropped (0: the miner's 0.98; "
        "1: none, for a tiny random model whose embeddings sit close together)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.miner:
        parser.error(
            "--miner HOST:PORT is required: start a miner first, e.g. `helip-miner serve --dim 32 --port 50051`, "
            "then pass --miner 127.0.0.1:50051"
        )
    return args


def word_tokenizer(captions: list[str]) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the captions' words, built in memory (offline), with start and end tokens."""
    words = sorted({word for caption in captions for word in caption.lower().split()})
    vocab = {token: i for i, token in enumerate(SPECIAL + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<start> $A <end>", special_tokens=[("<start>", vocab["<start>"]), ("<end>", vocab["<end>"])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<start>",
        eos_token="<end>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_TEXT,
        model_input_names=["input_ids", "attention_mask"],
    )


def tiny_model(kind: str, tokenizer) -> tuple[torch.nn.Module, object]:
    """A random CLIPModel or SiglipModel of EMBED_DIM-wide embeddings, and its processor."""
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=EMBED_DIM,
        intermediate_size=2 * EMBED_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # CLIP pools the text at its first end token
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_size=EMBED_DIM,
        intermediate_size=2 * EMBED_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    if kind == "clip":
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED_DIM)
        image_processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
        return transformers.CLIPModel(config), transformers.CLIPProcessor(image_processor, tokenizer)
    # SigLIP's text head projects to the vision width: both towers' embeddings are EMBED_DIM wide.
    config = transformers.SiglipConfig(text_config={**text, "projection_size": EMBED_DIM}, vision_config=vision)
    image_processor = transformers.SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return transformers.SiglipModel(config), transformers.SiglipProcessor(image_processor, tokenizer)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    training_args = transformers.TrainingArguments(
        output_dir=args.output_dir,
        max_steps=-1 if args.epochs else args.max_steps,
        num_train_epochs=args.epochs or 1,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        dataloader_num_workers=args.workers,
        learning_rate=args.lr,
        weight_decay=0.1,
        warmup_steps=2,
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        seed=args.seed,
        report_to="none",
        ddp_find_unused_parameters=False,  # every parameter takes part in the loss
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    transformers.set_seed(args.seed)

    dataset = helip.raw_pairs(args.train_data)  # helip: dataset[i] -> (i, PIL image, caption), by sample id
    tokenizer = word_tokenizer([dataset.caption(i) for i in range(len(dataset))])
    model, processor = tiny_model(args.model, tokenizer)

    # helip: one session per process, bound to its namespace on the miner; start() claims it and checks the miner.
    session = helip.MiningSession(
        address=args.miner,
        namespace=args.namespace,
        reset_namespace=args.reset_namespace,
        max_similarity=args.max_similarity,
    )
    session.start(EMBED_DIM, dataset)  # helip
    trainer = helip.HardPairTrainer(  # helip: a transformers.Trainer whose batches hold anchors + their hard pairs
        session=session,
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=processor,
        hard_ratio=args.hard_ratio,
    )
    resume = True if args.resume == "latest" else args.resume
    trainer.train(resume_from_checkpoint=resume)
    session.close()  # helip: stops mining, sends the last pushes

    summary = {"rank": training_args.process_index, "global_step": trainer.state.global_step, **trainer.summary()}
    log.info("helip summary %s", json.dumps(summary))
    if trainer.is_world_process_zero():
        trainer.save_model()  # output_dir: the model and its processor, loadable with from_pretrained
        log.info("saved the model and processor to %s", args.output_dir)


if __name__ == "__main__":  # needed: DataLoader workers start from a forkserver, which imports this file
    main()
