"""Evaluation data as users lay it out: labelled images for zero-shot and the linear probe, caption CSVs for retrieval.

Two zero-shot layouts load into one `ZeroShotTask`:
- the synth layout (tools.synth): DIR/zeroshot.json = {"classnames", "templates", "samples": CSV relative to the
  json, "label_key": column holding the class index (default "label")};
- an ImageFolder directory (torchvision's convention: ROOT/<class folder>/<image>), classes in sorted folder order.
  Class names come from a file (one per line, a JSON list, or a JSON object mapping folder name -> class name), from
  `imagenet` (open_clip's 1000 ImageNet class names, in the order of ImageNet's sorted wnid folders), or from the
  folder names themselves (underscores read as spaces). Templates come from a file (one per line or a JSON list,
  each with `{}` where the class name goes), from `openai` / `simple` (open_clip's ImageNet template sets), or
  default to `openai` for ImageNet class names and to "a photo of a {}." otherwise.

`load_suite` gathers every source into an `EvalSuite`. Errors are `EvalDataError`s whose `field` says which input
was wrong (`synth_dir`, `zeroshot_dir`, `classnames`, `templates`, `retrieval_data`, `probe`, `probe_train_dir`),
so each shell can name its own flag or config key.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from helip.trainer.pairs.data import Transform
from helip.trainer.tools.probe import ProbeConfig

IMAGENET = "imagenet"
TEMPLATE_SETS = ("openai", "simple")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


class EvalDataError(ValueError):
    """Bad evaluation input; `field` names the input (see the module docstring), the message says what is wrong."""

    def __init__(self, field: str, detail: str):
        super().__init__(detail)
        self.field = field
        self.detail = detail


@dataclass(frozen=True)
class ZeroShotTask:
    """Labelled images plus the words that describe their classes. `labels[i]` indexes `classnames`."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    image_paths: tuple[Path, ...]
    labels: tuple[int, ...]

    def __post_init__(self):
        if not self.classnames:
            raise EvalDataError("classnames", "no class names")
        if not self.templates:
            raise EvalDataError("templates", "no templates")
        bad = [t for t in self.templates if "{}" not in t]
        if bad:
            raise EvalDataError("templates", f"every template needs '{{}}' where the class name goes: {bad[:3]}")
        if not self.labels:
            raise EvalDataError("zeroshot_dir", "no labelled images")
        if len(self.labels) != len(self.image_paths):
            raise EvalDataError("zeroshot_dir", f"{len(self.image_paths)} images but {len(self.labels)} labels")
        if min(self.labels) < 0 or max(self.labels) >= len(self.classnames):
            raise EvalDataError("zeroshot_dir", f"labels must index the {len(self.classnames)} class names")

    def prompts(self) -> list[str]:
        """Every template for class 0, then for class 1, ...: len(classnames) * len(templates) strings."""
        return [template.format(name) for name in self.classnames for template in self.templates]


class LabelledImages(Dataset):
    """(image tensor, label) by index, for a task's images. An evaluation set must be whole: a bad image raises."""

    def __init__(self, image_paths: Sequence[Path], labels: Sequence[int], transform: Transform):
        self.image_paths, self.labels, self.transform = list(image_paths), list(labels), transform

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.image_paths[i]) as image:
            return self.transform(image.convert("RGB")), self.labels[i]


def load_zero_shot_task(task: str | Path) -> tuple[list[str], list[str], Path, str]:
    """(classnames, templates, samples CSV path, label column) from a task json or a directory holding zeroshot.json."""
    path = Path(task)
    if path.is_dir():
        path = path / "zeroshot.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    for field in ("classnames", "templates", "samples"):
        if field not in spec:
            raise ValueError(f"{path}: zero-shot task lacks the field {field!r}")
    if not spec["classnames"] or not spec["templates"]:
        raise ValueError(f"{path}: 'classnames' and 'templates' must be non-empty")
    bad = [t for t in spec["templates"] if "{}" not in t]
    if bad:
        raise ValueError(f"{path}: templates must contain '{{}}' for the class name: {bad}")
    return spec["classnames"], spec["templates"], path.parent / spec["samples"], spec.get("label_key", "label")


def synth_task(task: str | Path, sep: str = "\t") -> ZeroShotTask:
    """The synth layout's zero-shot task (a zeroshot.json or the directory holding it)."""
    from helip.trainer.pairs.data import read_csv_rows

    classnames, templates, samples_csv, label_key = load_zero_shot_task(task)
    rows = read_csv_rows(samples_csv, ["filepath", label_key], sep)
    if not rows:
        raise ValueError(f"{samples_csv}: no zero-shot samples")
    try:
        labels = tuple(int(row[label_key]) for row in rows)
    except ValueError as error:
        raise ValueError(f"{samples_csv}: column {label_key!r} must hold class indices ({error})") from None
    if min(labels) < 0 or max(labels) >= len(classnames):
        raise ValueError(f"{samples_csv}: column {label_key!r} must index the {len(classnames)} classnames")
    paths = tuple(samples_csv.parent / row["filepath"] for row in rows)
    return ZeroShotTask(tuple(classnames), tuple(templates), paths, labels)


def _read_list(path: Path, field: str) -> list[str] | dict[str, str]:
    """A JSON list / object, or else one entry per non-blank line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        names = {"classnames": f"'{IMAGENET}'", "templates": " or ".join(f"'{name}'" for name in TEMPLATE_SETS)}
        raise EvalDataError(
            field, f"cannot read {path} ({error.strerror or error}); give a file or {names.get(field, 'a file')}"
        ) from None
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise EvalDataError(field, f"{path} is not valid JSON: {error}") from None
        entries = value.values() if isinstance(value, dict) else value
        if not all(isinstance(entry, str) for entry in entries):
            raise EvalDataError(field, f"{path}: every entry must be a string")
        return value
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_classnames(spec: str, folders: Sequence[str]) -> list[str]:
    """Class names for the sorted class `folders`: see the module docstring for what `spec` may be."""
    if not spec:
        return [folder.replace("_", " ") for folder in folders]
    if spec == IMAGENET:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names: list[str] | dict[str, str] = list(IMAGENET_CLASSNAMES)
    else:
        names = _read_list(Path(spec), "classnames")
    if isinstance(names, dict):
        missing = [folder for folder in folders if folder not in names]
        if missing:
            raise EvalDataError("classnames", f"{spec} has no class name for the folder(s) {missing[:5]}")
        return [names[folder] for folder in folders]
    if len(names) != len(folders):
        raise EvalDataError(
            "classnames", f"{spec} gives {len(names)} class names for {len(folders)} class folders; they must match"
        )
    return names


def read_templates(spec: str, classnames_spec: str = "") -> list[str]:
    """Prompt templates: see the module docstring for what `spec` may be, and the default."""
    if not spec:
        spec = "openai" if classnames_spec == IMAGENET else ""
    if not spec:
        return list(DEFAULT_TEMPLATES)
    if spec in TEMPLATE_SETS:
        from open_clip import zero_shot_metadata

        chosen = {
            "openai": zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES,
            "simple": zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES,
        }
        # open_clip's templates are functions of the class name; given "{}" they yield the format string.
        return [template("{}") for template in chosen[spec]]
    templates = _read_list(Path(spec), "templates")
    if isinstance(templates, dict):
        raise EvalDataError("templates", f"{spec}: expected a list of templates, got a JSON object")
    return templates


def image_folder_samples(root: str | Path, field: str = "zeroshot_dir") -> tuple[list[str], list[Path], list[int]]:
    """(sorted class folder names, image paths, labels) of an ImageFolder directory, as torchvision lists them."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise EvalDataError(field, f"{root} is not a directory")
    try:
        folder = ImageFolder(str(root))
    except OSError as error:  # FileNotFoundError: no class folders, or class folders without images
        raise EvalDataError(field, f"{root}: {error}") from None
    return folder.classes, [Path(path) for path, _ in folder.samples], [label for _, label in folder.samples]


def image_folder_task(root: str | Path, classnames: str = "", templates: str = "") -> ZeroShotTask:
    """A zero-shot task over an ImageFolder directory; `classnames` and `templates` as in the module docstring."""
    folders, paths, labels = image_folder_samples(root)
    names = read_classnames(classnames, folders)
    return ZeroShotTask(tuple(names), tuple(read_templates(templates, classnames)), tuple(paths), tuple(labels))


@dataclass(frozen=True)
class RetrievalCsv:
    """Image-caption pairs in the training data's format: row i's caption is image i's only match."""

    path: Path
    img_key: str = "filepath"
    caption_key: str = "title"
    sep: str = "\t"


@dataclass(frozen=True)
class EvalSuite:
    """What to evaluate, loaded and checked; each part is optional, at least one of the first three is there.

    With `probe` set, a linear probe is scored on `zero_shot_task` (or, without one, the synth layout's zero-shot
    task), fitted on `probe_train_task` when given, else on a seeded split of the scored task."""

    synth_dir: Path | None = None
    zero_shot_task: ZeroShotTask | None = None
    retrieval_csv: RetrievalCsv | None = None
    probe: ProbeConfig | None = None
    probe_train_task: ZeroShotTask | None = None

    def __post_init__(self):
        if self.synth_dir is None and self.zero_shot_task is None and self.retrieval_csv is None:
            raise EvalDataError(
                "synth_dir", "nothing to evaluate: no synth layout, zero-shot directory or retrieval CSV"
            )
        if self.probe is not None and self.zero_shot_task is None and self.synth_dir is None:
            raise EvalDataError(
                "probe", "the linear probe needs labelled images: a zero-shot directory or synth layout"
            )


def load_suite(
    synth_dir: str | Path = "",
    zeroshot_dir: str | Path = "",
    classnames: str = "",
    templates: str = "",
    retrieval_data: str | Path = "",
    img_key: str = "filepath",
    caption_key: str = "title",
    sep: str = "\t",
    probe: ProbeConfig | None = None,
    probe_train_dir: str | Path = "",
) -> EvalSuite:
    """Load and check every named source (empty: absent). Raises EvalDataError naming the input at fault."""
    if synth_dir and not (Path(synth_dir) / "zeroshot.json").is_file():
        raise EvalDataError("synth_dir", f"{synth_dir} has no zeroshot.json (write one with `helip-data synth`)")
    if (classnames or templates) and not zeroshot_dir:
        raise EvalDataError("classnames" if classnames else "templates", "is only used with a zero-shot directory")
    task = image_folder_task(zeroshot_dir, classnames, templates) if zeroshot_dir else None
    train_task = None
    if probe_train_dir:
        if probe is None or task is None:
            raise EvalDataError("probe_train_dir", "needs the linear probe and a zero-shot directory")
        folders, paths, labels = image_folder_samples(probe_train_dir, "probe_train_dir")
        scored_folders = image_folder_samples(zeroshot_dir)[0]
        if folders != scored_folders:
            raise EvalDataError(
                "probe_train_dir", f"its class folders {folders[:5]}... differ from the zero-shot directory's"
            )
        train_task = ZeroShotTask(task.classnames, task.templates, tuple(paths), tuple(labels))
    retrieval_csv = None
    if retrieval_data:
        retrieval_csv = _retrieval_csv(Path(retrieval_data), img_key, caption_key, sep)
    return EvalSuite(Path(synth_dir) if synth_dir else None, task, retrieval_csv, probe, train_task)


def _retrieval_csv(path: Path, img_key: str, caption_key: str, sep: str) -> RetrievalCsv:
    from helip.trainer.pairs.data import read_csv_rows

    if not path.is_file():
        raise EvalDataError("retrieval_data", f"{path} is not a file")
    try:
        rows = read_csv_rows(path, [img_key, caption_key], sep)
    except ValueError as error:
        raise EvalDataError("retrieval_data", str(error)) from None
    if not rows:
        raise EvalDataError("retrieval_data", f"{path} has no rows")
    return RetrievalCsv(path, img_key, caption_key, sep)
