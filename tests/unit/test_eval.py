"""Evaluation: a model that knows every answer scores 1, a wrong or degenerate one scores 0, a random one in [0, 1]."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from torch import nn
from torchvision import transforms

from trainer import eval as helip_eval
from trainer import eval_metrics
from trainer.data import CsvPairs, read_csv_rows
from trainer.synth import SynthConfig, generate

TRANSFORM = transforms.ToTensor()
TOKENIZE = open_clip.get_tokenizer("ViT-B-32")
TINY_CONFIG = "configs/models/helip-tiny.json"


class LookupModel(nn.Module):
    """Maps an image (by its exact pixels) and a text (by its exact tokens) to the one-hot vector of a given index.

    With the right tables it is an oracle: an image and its caption land on the same vector, nothing else does.
    """

    def __init__(self, image_index: dict[bytes, int], text_index: dict[bytes, int], dim: int):
        super().__init__()
        self.image_index, self.text_index, self.dim = image_index, text_index, dim

    def _one_hot(self, rows: torch.Tensor, index: dict[bytes, int]) -> torch.Tensor:
        return torch.eye(self.dim)[[index[row.numpy().tobytes()] for row in rows]]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._one_hot(images, self.image_index)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._one_hot(tokens, self.text_index)


class ConstantModel(nn.Module):
    def encode_image(self, images):
        return torch.ones(len(images), 8)

    def encode_text(self, tokens):
        return torch.ones(len(tokens), 8)


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    return generate(SynthConfig(tmp_path_factory.mktemp("synth"), train_size=2, test_size=60, seed=5))


def _key(tensor: torch.Tensor) -> bytes:
    return tensor.numpy().tobytes()


def _retrieval_oracle(csv_path, shift: int = 0) -> LookupModel:
    """Image i -> i, caption i -> i + shift (mod n): shift 0 is the oracle, any other shift always wrong."""
    pairs = CsvPairs(csv_path, TRANSFORM, TOKENIZE)
    n = len(pairs)
    image_index = {_key(pairs[i][1]): i for i in range(n)}
    text_index = {_key(pairs[i][2]): (i + shift) % n for i in range(n)}
    return LookupModel(image_index, text_index, n)


def _zero_shot_oracle(task_dir, shift: int = 0) -> LookupModel:
    classnames, templates, samples_csv, label_key = helip_eval.load_zero_shot_task(task_dir)
    pairs = CsvPairs(samples_csv, TRANSFORM, TOKENIZE)
    labels = [int(row[label_key]) for row in read_csv_rows(samples_csv, [label_key])]
    n = len(classnames)
    image_index = {_key(pairs[i][1]): labels[i] for i in range(len(pairs))}
    text_index = {
        _key(TOKENIZE([t.format(name)])[0]): (c + shift) % n for c, name in enumerate(classnames) for t in templates
    }
    return LookupModel(image_index, text_index, n)


def test_hits_counts_ties_against_the_target():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.7, 0.7, 0.0], [0.2, 0.8, 0.1]])
    hits = eval_metrics._hits(scores, torch.tensor([0, 1, 2]), (1, 2, 3))
    # row 0: rank 0; row 1: tied with one other, so rank 1; row 2: two score higher, so rank 2
    assert hits == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})


def test_oracle_scores_one_on_retrieval(synth_set):
    metrics = helip_eval.retrieval(
        _retrieval_oracle(synth_set.retrieval_csv), TOKENIZE, TRANSFORM, synth_set.retrieval_csv, batch_size=16
    )
    assert set(metrics) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert all(v == 1.0 for v in metrics.values()), metrics


def test_wrong_retrieval_model_scores_zero(synth_set):
    metrics = helip_eval.retrieval(
        _retrieval_oracle(synth_set.retrieval_csv, shift=1), TOKENIZE, TRANSFORM, synth_set.retrieval_csv, batch_size=16
    )
    assert metrics["image_to_text_R@1"] == metrics["text_to_image_R@1"] == 0.0
    # One-hot scores: the true match scores 0 like every other non-hit, so pessimistic ranking never recalls it.
    assert metrics["image_to_text_R@10"] == 0.0


def test_oracle_scores_one_on_zero_shot(synth_set):
    metrics = helip_eval.zero_shot(_zero_shot_oracle(synth_set.root), TOKENIZE, TRANSFORM, synth_set.root, batch_size=7)
    assert metrics == {"top1": 1.0, "top5": 1.0}


def test_wrong_class_model_scores_zero_on_zero_shot(synth_set):
    metrics = helip_eval.zero_shot(
        _zero_shot_oracle(synth_set.root, shift=1), TOKENIZE, TRANSFORM, synth_set.zeroshot_json
    )
    assert metrics == {"top1": 0.0, "top5": 0.0}


def test_constant_model_scores_zero(synth_set):
    metrics = helip_eval.evaluate(ConstantModel(), TOKENIZE, TRANSFORM, synth_set.root)
    assert len(metrics) == 8
    assert all(v == 0.0 for v in metrics.values()), metrics


def test_random_open_clip_model_scores_in_unit_interval(synth_set):
    model, transform, tokenizer = helip_eval.build_model(TINY_CONFIG, None)
    model.train()
    metrics = helip_eval.evaluate(model, tokenizer, transform, synth_set.root, batch_size=32, device="cpu")
    assert sorted(metrics) == sorted(
        ["zero_shot/top1", "zero_shot/top5"]
        + [f"retrieval/{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    )
    assert all(0.0 <= v <= 1.0 for v in metrics.values()), metrics
    assert metrics["zero_shot/top1"] <= metrics["zero_shot/top5"]
    assert metrics["retrieval/image_to_text_R@1"] <= metrics["retrieval/image_to_text_R@10"]
    assert model.training  # evaluation mid-training must not leave the model in eval mode


def test_build_model_loads_wrapped_checkpoint(tmp_path):
    source, _, _ = helip_eval.build_model(TINY_CONFIG, None)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded, _, tokenizer = helip_eval.build_model(TINY_CONFIG, str(path))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert tokenizer(["a red circle"]).shape == (1, 32)  # the config's context length
    with pytest.raises(FileNotFoundError, match="nope.json"):
        helip_eval.build_model(str(tmp_path / "nope.json"), None)


def test_cli_prints_and_writes_json(synth_set, tmp_path, capsys):
    model, _, _ = helip_eval.build_model(TINY_CONFIG, None)
    checkpoint = tmp_path / "plain.pt"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "metrics" / "eval.json"
    code = helip_eval.main(
        [
            "--model",
            TINY_CONFIG,
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(synth_set.root),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert "zero_shot/top1" in printed


def test_cli_rejects_a_directory_without_a_task(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        helip_eval.main(["--model", TINY_CONFIG, "--data", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--data" in capsys.readouterr().err


def test_zero_shot_task_missing_field_is_named(tmp_path):
    (tmp_path / "zeroshot.json").write_text(json.dumps({"classnames": ["a"], "samples": "x.csv"}))
    with pytest.raises(ValueError, match="'templates'"):
        helip_eval.zero_shot(ConstantModel(), TOKENIZE, TRANSFORM, tmp_path)


class _FixedModel(nn.Module):
    """Every image maps to `image_vector`; a text maps to the vector its exact tokens were assigned."""

    def __init__(self, image_vector: list[float], text_vectors: dict[bytes, list[float]]):
        super().__init__()
        self.image_vector, self.text_vectors = torch.tensor(image_vector), text_vectors

    def encode_image(self, images):
        return self.image_vector.expand(len(images), -1)

    def encode_text(self, tokens):
        return torch.tensor([self.text_vectors[_key(row)] for row in tokens])


def test_class_embedding_is_the_mean_of_normalised_template_embeddings(synth_set, tmp_path):
    """Class "cat" has one long template vector along x and one short along y: averaged after normalising, the class
    points along the diagonal and wins the image at 60 degrees; averaged raw, it would point along x and lose."""
    vectors = {"a cat.": [100.0, 0.0], "the cat.": [0.0, 1.0], "a dog.": [0.0, 2.0], "the dog.": [0.0, 3.0]}
    text_vectors = {_key(TOKENIZE([prompt])[0]): v for prompt, v in vectors.items()}
    image = synth_set.root / read_csv_rows(synth_set.test_csv, ["filepath"])[0]["filepath"]
    (tmp_path / "samples.csv").write_text(f"filepath\ttitle\tlabel\n{image}\tcat\t0\n")
    task = {"classnames": ["cat", "dog"], "templates": ["a {}.", "the {}."], "samples": "samples.csv"}
    (tmp_path / "zeroshot.json").write_text(json.dumps(task))
    model = _FixedModel([0.5, 0.866], text_vectors)
    assert helip_eval.zero_shot(model, TOKENIZE, TRANSFORM, tmp_path)["top1"] == 1.0
