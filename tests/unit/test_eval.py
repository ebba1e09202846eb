"""Evaluation: a model that knows every answer scores 1, a wrong or degenerate one scores 0, a random one in [0, 1]."""

from __future__ import annotations

import csv
import json
import shutil

import open_clip
import pytest
import torch
from torch import nn
from torchvision import transforms

from helip.trainer.pairs.data import CsvPairs, read_csv_rows
from helip.trainer.tools import eval as helip_eval
from helip.trainer.tools import eval_metrics
from helip.trainer.tools.eval_tasks import ZeroShotTask, image_folder_task, load_suite, synth_task
from helip.trainer.tools.probe import ProbeConfig
from helip.trainer.tools.synth import SynthConfig, generate

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
    model, transform, tokenizer = helip_eval.load_model(TINY_CONFIG, None)
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


def test_load_model_loads_wrapped_checkpoint(tmp_path):
    source, _, _ = helip_eval.load_model(TINY_CONFIG, None)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded, _, tokenizer = helip_eval.load_model(TINY_CONFIG, str(path))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert tokenizer(["a red circle"]).shape == (1, 32)  # the config's context length
    with pytest.raises(FileNotFoundError, match="nope.json"):
        helip_eval.load_model(str(tmp_path / "nope.json"), None)


def test_cli_prints_and_writes_json(synth_set, tmp_path, capsys):
    model, _, _ = helip_eval.load_model(TINY_CONFIG, None)
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


# ---- user layouts: ImageFolder zero-shot, retrieval CSV, linear probe, the CLI ------------------------------------


@pytest.fixture(scope="module")
def folder_layout(synth_set, tmp_path_factory):
    """The synth set's zero-shot images rearranged into ImageFolder class folders, plus the synth-layout task over
    exactly the classes that have images (ImageFolder needs every class folder to hold an image)."""
    root = tmp_path_factory.mktemp("folders")
    classnames, templates, samples_csv, label_key = helip_eval.load_zero_shot_task(synth_set.root)
    rows = read_csv_rows(samples_csv, ["filepath", "title", label_key])
    present = sorted({int(row[label_key]) for row in rows})
    relabel = {old: new for new, old in enumerate(present)}
    synth_rows = []
    for i, row in enumerate(rows):
        label = relabel[int(row[label_key])]
        image = root / "val" / f"class_{label:02d}" / f"{i:04d}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(synth_set.root / row["filepath"], image)
        synth_rows.append(f"{image}\t{row['title']}\t{label}")
    names = [classnames[old] for old in present]
    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    (root / "templates.json").write_text(json.dumps(templates))
    task_dir = root / "synth"
    task_dir.mkdir()
    (task_dir / "samples.csv").write_text("filepath\ttitle\tlabel\n" + "\n".join(synth_rows) + "\n")
    (task_dir / "zeroshot.json").write_text(
        json.dumps({"classnames": names, "templates": templates, "samples": "samples.csv"})
    )
    assert len(present) >= 5, "the fixture needs several classes"
    return root


@pytest.fixture(scope="module")
def tiny_model():
    model, transform, tokenizer = helip_eval.load_model(TINY_CONFIG, None)
    return model, transform, tokenizer


def test_image_folder_zero_shot_equals_the_synth_layout_on_the_same_images(folder_layout, tiny_model):
    model, transform, tokenizer = tiny_model
    task = image_folder_task(
        folder_layout / "val", str(folder_layout / "classnames.txt"), str(folder_layout / "templates.json")
    )
    from_folders = helip_eval.zero_shot(model, tokenizer, transform, task, batch_size=16)
    from_synth = helip_eval.zero_shot(model, tokenizer, transform, folder_layout / "synth", batch_size=16)
    assert from_folders == pytest.approx(from_synth, abs=1e-9)
    # The oracle built from the synth task scores 1 on the folders too: labels came from the right folders.
    oracle = _zero_shot_oracle(folder_layout / "synth")
    assert helip_eval.zero_shot(oracle, TOKENIZE, TRANSFORM, task) == {"top1": 1.0, "top5": 1.0}


def test_retrieval_csv_equals_the_synth_layout_on_the_same_rows(synth_set, tiny_model, tmp_path):
    """The same rows as a comma-separated file with other column names and absolute paths."""
    model, transform, tokenizer = tiny_model
    rows = read_csv_rows(synth_set.retrieval_csv, ["filepath", "title"])
    with (tmp_path / "pairs.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["caption", "image"])
        writer.writerows([row["title"], str(synth_set.root / row["filepath"])] for row in rows)
    suite = load_suite(
        synth_dir=synth_set.root, retrieval_data=tmp_path / "pairs.csv", img_key="image", caption_key="caption", sep=","
    )
    metrics = helip_eval.evaluate_suite(model, tokenizer, transform, suite, batch_size=32)
    from_csv = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("retrieval_csv/")}
    from_synth = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("retrieval/")}
    assert len(from_csv) == 6 and from_csv == pytest.approx(from_synth, abs=1e-9)


def test_linear_probe_on_an_oracle_is_perfect_and_on_a_constant_model_is_the_majority(synth_set):
    task = synth_task(synth_set.root)
    oracle = _zero_shot_oracle(synth_set.root)  # one-hot of the label: linearly separable features
    # Fitted and scored on the same images.
    assert helip_eval.linear_probe(oracle, TRANSFORM, task, train_task=task) == {"top1": 1.0}
    # Constant features: the probe can only learn the training labels' majority (class 2 here) and predict it.
    train_task = ZeroShotTask(task.classnames, task.templates, task.image_paths[:5], (2, 2, 2, 0, 1))
    expected = sum(label == 2 for label in task.labels) / len(task.labels)
    assert helip_eval.linear_probe(ConstantModel(), TRANSFORM, task, train_task)["top1"] == pytest.approx(expected)
    # Without a training set, a stratified split of the scored set: every held-out class was also trained on.
    assert helip_eval.linear_probe(oracle, TRANSFORM, task, config=ProbeConfig(seed=4)) == {"top1": 1.0}


def _cli(*args: str) -> list[str]:
    return ["--model", TINY_CONFIG, "--device", "cpu", *args]


def test_cli_on_user_layouts(folder_layout, synth_set, tmp_path, capsys):
    (tmp_path / "pairs.tsv").write_text(
        "image\ttext\n"
        + "".join(
            f"{synth_set.root / r['filepath']}\t{r['title']}\n"
            for r in read_csv_rows(synth_set.retrieval_csv, ["filepath", "title"])[:12]
        )
    )
    _copy_tree(folder_layout / "val", tmp_path / "train")  # a probe training set with the same class folders
    code = helip_eval.main(
        _cli(
            "--zeroshot-dir",
            str(folder_layout / "val"),
            "--classnames",
            str(folder_layout / "classnames.txt"),
            "--templates",
            str(folder_layout / "templates.json"),
            "--retrieval-data",
            str(tmp_path / "pairs.tsv"),
            "--img-key",
            "image",
            "--caption-key",
            "text",
            "--separator",
            "\\t",
            "--linear-probe",
            "--probe-train-dir",
            str(tmp_path / "train"),
            "--batch-size",
            "32",
        )
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(printed) == sorted(
        ["zero_shot_folder/top1", "zero_shot_folder/top5", "linear_probe/top1"]
        + [f"retrieval_csv/{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    )
    assert all(0.0 <= v <= 1.0 for v in printed.values()), printed


def _copy_tree(source, target):
    shutil.copytree(source, target, dirs_exist_ok=True)


@pytest.mark.parametrize(
    "args, flag",
    [
        ([], "--data"),
        (["--zeroshot-dir", "{tmp}/nowhere"], "--zeroshot-dir"),
        (["--zeroshot-dir", "{val}", "--classnames", "{tmp}/three.txt"], "--classnames"),
        (["--zeroshot-dir", "{val}", "--templates", "{tmp}/no_braces.txt"], "--templates"),
        (["--data", "{synth}", "--classnames", "imagenet"], "--classnames"),
        (["--retrieval-data", "{tmp}/three.txt"], "--retrieval-data"),
        (["--retrieval-data", "{synth}/retrieval.csv", "--linear-probe"], "--linear-probe"),
        (["--data", "{synth}", "--linear-probe", "--probe-test-fraction", "1.5"], "--probe-test-fraction"),
        (["--zeroshot-dir", "{val}", "--probe-train-dir", "{val}"], "--probe-train-dir"),
        (["--data", "{synth}", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_cli_bad_input_exits_2_naming_the_flag(args, flag, folder_layout, synth_set, tmp_path, capsys):
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    (tmp_path / "no_braces.txt").write_text("a photo.\n")
    where = {"tmp": tmp_path, "val": folder_layout / "val", "synth": synth_set.root}
    with pytest.raises(SystemExit) as exit_info:
        helip_eval.main(_cli(*(arg.format(**where) for arg in args)))
    assert exit_info.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err
