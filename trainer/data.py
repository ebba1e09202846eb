"""Image-text pair datasets with stable integer ids and random access by id.

The miner returns hard pairs as sample ids, and the trainer composes batches from arbitrary ids, so every data
set here is map-style: `dataset[i] -> (i, image, tokens)`, where i is the row index in a CSV or the ordinal of the
sample across an ordered list of webdataset shards. Ids never depend on shuffling, workers or ranks.

`transform` maps a PIL RGB image to a float tensor [3, H, W] (open_clip's preprocess does); `tokenize` maps a
list of N strings to a LongTensor [N, L] (open_clip's tokenizer does). Nothing here depends on a specific model.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]
Tokenize = Callable[[list[str]], torch.Tensor]
Sample = tuple[int, torch.Tensor, torch.Tensor]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
CSV_SUFFIXES = (".csv", ".tsv")


def read_csv_rows(path: str | Path, columns: Sequence[str], sep: str = "\t") -> list[dict[str, str]]:
    """Rows of a delimited file as dicts; raises ValueError naming any of `columns` that the header lacks."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=sep)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; the header has {header} (separator {sep!r})"
            )
        return list(reader)


def read_pairs(
    path: str | Path, img_key: str = "filepath", caption_key: str = "title", sep: str = "\t"
) -> list[tuple[Path, str]]:
    """(image path, caption) per row. A relative image path is relative to the CSV's directory."""
    path = Path(path)
    base = path.parent
    return [(base / row[img_key], row[caption_key]) for row in read_csv_rows(path, [img_key, caption_key], sep)]


def _load_image(source: str | Path | io.BytesIO) -> Image.Image:
    with Image.open(source) as image:
        return image.convert("RGB")


class CsvPairs(Dataset):
    """Pairs listed in an open_clip-style CSV (default: tab-separated, columns `filepath` and `title`).

    Image paths may be absolute or relative to the CSV's directory. Sample id = row index (0-based, header excluded).
    """

    def __init__(
        self,
        path: str | Path,
        transform: Transform,
        tokenize: Tokenize,
        img_key: str = "filepath",
        caption_key: str = "title",
        sep: str = "\t",
    ):
        self.path = Path(path)
        self.pairs = read_pairs(self.path, img_key, caption_key, sep)
        self.transform = transform
        self.tokenize = tokenize
        log.debug("CsvPairs: %d pairs from %s", len(self.pairs), self.path)

    def __len__(self) -> int:
        return len(self.pairs)

    def caption(self, i: int) -> str:
        return self.pairs[i][1]

    def __getitem__(self, i: int) -> Sample:
        image_path, caption = self.pairs[i]
        return i, self.transform(_load_image(image_path)), self.tokenize([caption])[0]


@dataclass(frozen=True)
class _Member:
    """Where one tar member's bytes lie: shard index, byte offset of the data and its size."""

    shard: int
    offset: int
    size: int


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """A brace pattern ("dir/shard-{000000..000009}.tar"), a '::'-joined list, or a list, as an ordered list."""
    if isinstance(shards, (str, os.PathLike)):
        import braceexpand  # a webdataset dependency; imported here so CSV-only users don't need it

        return [s for part in str(shards).split("::") for s in braceexpand.braceexpand(part)]
    return [str(s) for s in shards]


def _index_shards(shards: list[str]) -> list[tuple[_Member, _Member]]:
    """(image member, caption member) per sample, in shard order then member order; keys follow webdataset:
    everything in the member's name up to the first dot of its base name."""
    samples: list[tuple[_Member, _Member]] = []
    for shard_index, shard in enumerate(shards):
        if not Path(shard).is_file():
            raise FileNotFoundError(f"webdataset shard not found: {shard}")
        groups: dict[str, dict[str, _Member]] = {}
        with tarfile.open(shard, "r:") as tar:  # "r:" = uncompressed only: random access needs plain offsets
            for info in tar:
                if not info.isfile():
                    continue
                directory, _, base = info.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                groups.setdefault(key, {})[ext.lower()] = _Member(shard_index, info.offset_data, info.size)
        for key, members in groups.items():  # dicts keep insertion order: the order of the shard
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            if image is None or "txt" not in members:
                raise ValueError(
                    f"{shard}: sample {key!r} needs an image ({'/'.join(IMAGE_EXTENSIONS)}) and a .txt caption, "
                    f"has {sorted(members)}"
                )
            samples.append((image, members["txt"]))
    return samples


class WebDatasetPairs(Dataset):
    """Random access over uncompressed webdataset .tar shards (key.png|.jpg|.jpeg|.webp + key.txt per sample).

    The member index (byte offsets) is built once at construction by reading the tar headers. Sample id = ordinal
    of the sample across the shards in the given order. File handles are opened lazily per process, so the data
    set can be passed to DataLoader workers.
    """

    def __init__(self, shards: str | Sequence[str], transform: Transform, tokenize: Tokenize):
        self.shards = expand_shards(shards)
        if not self.shards:
            raise ValueError(f"no webdataset shards in {shards!r}")
        self.samples = _index_shards(self.shards)
        self.transform = transform
        self.tokenize = tokenize
        self._files: dict[int, io.BufferedReader] = {}
        self._pid = os.getpid()
        log.debug("WebDatasetPairs: %d samples in %d shards", len(self.samples), len(self.shards))

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = {}  # handles don't survive pickling into workers
        return state

    def _read(self, member: _Member) -> bytes:
        if self._pid != os.getpid():  # forked worker: never share a file position with the parent
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(member.shard)
        if f is None:
            f = self._files[member.shard] = open(self.shards[member.shard], "rb")
        f.seek(member.offset)
        return f.read(member.size)

    def caption(self, i: int) -> str:
        return self._read(self.samples[i][1]).decode("utf-8")

    def __getitem__(self, i: int) -> Sample:
        image_member, text_member = self.samples[i]
        image = _load_image(io.BytesIO(self._read(image_member)))
        caption = self._read(text_member).decode("utf-8")
        return i, self.transform(image), self.tokenize([caption])[0]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


def open_pairs(
    spec: str | Path | Sequence[str], transform: Transform, tokenize: Tokenize, **csv_options
) -> CsvPairs | WebDatasetPairs:
    """A CsvPairs for a .csv/.tsv path (csv_options: img_key, caption_key, sep), a WebDatasetPairs for a .tar
    path, a brace pattern or a list of shards."""
    if not isinstance(spec, (str, os.PathLike)):
        return WebDatasetPairs(list(spec), transform, tokenize)
    text = str(spec)
    if Path(text).suffix.lower() in CSV_SUFFIXES:
        return CsvPairs(text, transform, tokenize, **csv_options)
    if text.endswith(".tar") or "{" in text:
        return WebDatasetPairs(text, transform, tokenize)
    raise ValueError(f"cannot tell the data format of {text!r}: expected a .csv/.tsv file or .tar shards")


def collate(batch: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack samples into (ids LongTensor[B], images [B, 3, H, W], tokens [B, L])."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    ids = torch.tensor([sample[0] for sample in batch], dtype=torch.long)
    images = torch.stack([sample[1] for sample in batch])
    tokens = torch.stack([sample[2] for sample in batch])
    return ids, images, tokens
