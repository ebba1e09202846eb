"""Image-text pair datasets with stable integer ids and random access by id.

The miner returns hard pairs as sample ids, and the trainer composes batches from arbitrary ids, so every data
set here is map-style: `dataset[i] -> (i, image, tokens)`, where i is the row index in a CSV or the ordinal of the
sample across an ordered list of webdataset shards. Ids never depend on shuffling, workers or ranks.

`transform` maps a PIL RGB image to a float tensor [3, H, W] (open_clip's preprocess does); `tokenize` maps a
list of N strings to a LongTensor [N, L] (open_clip's tokenizer does). Nothing here depends on a specific model.

Bad samples (a missing file, an image that does not decode, an empty caption) never end a run. `dataset[i]`
then returns a deterministic substitute sample (its own id, so its embedding is pushed under the right row)
and lists the bad ids it stepped over in `Sample.skipped`; `collate_pairs` gathers them into the batch, where
`BadSampleLedger` counts them, logs them and stops the run past a configured fraction. The batch keeps its
size, which data-parallel ranks need (the contrastive loss gathers equal-sized batches).

Webdataset shards are indexed from their tar headers (helip.trainer.pairs.shards, which also reads what
img2dataset left out of them). webdataset's own indexed reader (`wids`) was looked at first: it needs a separate
index with each shard's sample count, copies every shard into a cache directory even when it is a local file, and
is no longer part of webdataset 1.x; a header scan of local shards needs none of that.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from helip.trainer.pairs.shards import Member, expand_shards, index_shards

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]
Tokenize = Callable[[list[str]], torch.Tensor]

CSV_SUFFIXES = (".csv", ".tsv")


def read_csv_rows(path: str | Path, columns: Sequence[str], sep: str = "\t") -> list[dict[str, str]]:
    """Rows of a delimited file as dicts; raises ValueError naming any of `columns` that the header lacks."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=sep)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; the header has {header} (separator {sep!r})")
        return list(reader)


def read_pairs(
    path: str | Path, img_key: str = "filepath", caption_key: str = "title", sep: str = "\t"
) -> list[tuple[Path, str]]:
    """(image path, caption) per row. A relative image path is relative to the CSV's directory."""
    path = Path(path)
    base = path.parent
    return [(base / row[img_key], row[caption_key]) for row in read_csv_rows(path, [img_key, caption_key], sep)]


class BadSampleError(Exception):
    """A sample that cannot be used; `kind` is a short label fit for a metric (missing_file, ...)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class BadSample:
    id: int
    kind: str  # missing_file | unreadable_image | unreadable_caption | empty_caption
    detail: str


class Sample(tuple):
    """(id, image [3, H, W], tokens [L]), unpacked as a 3-tuple; `skipped` lists the bad samples it replaces."""

    def __new__(cls, id: int, image: torch.Tensor, tokens: torch.Tensor, skipped: tuple[BadSample, ...] = ()):
        sample = super().__new__(cls, (id, image, tokens))
        sample.skipped = tuple(skipped)
        return sample

    def __getnewargs__(self):  # pickling into and out of DataLoader workers
        return (*self, self.skipped)

    @property
    def id(self) -> int:
        return self[0]


def _load_image(source: str | Path | io.BytesIO) -> Image.Image:
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise BadSampleError("missing_file", str(error)) from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        # PIL raises OSError (UnidentifiedImageError, truncated data), ValueError or SyntaxError on bad bytes.
        raise BadSampleError("unreadable_image", f"{source}: {error}") from None


def _checked_caption(caption: str) -> str:
    if not caption.strip():
        raise BadSampleError("empty_caption", "the caption is empty")
    return caption


class PairDataset(Dataset):
    """Map-style image-text pairs by id. Subclasses give `__len__`, `caption(i)` and `load(i)` -> (PIL image,
    caption), raising BadSampleError for a sample that cannot be used."""

    transform: Transform
    tokenize: Tokenize
    max_substitutes: int = 16  # bad samples stepped over for one id before giving up

    def load(self, i: int) -> tuple[Image.Image, str]:
        raise NotImplementedError

    def describe(self) -> dict:
        """What the data set holds, for the run's summary (a JSON object)."""
        return {"samples": len(self)}

    def substitute(self, i: int, attempt: int) -> int:
        """The id tried in place of `i` at `attempt` (0: i itself): deterministic, spread over the data set."""
        return i if attempt == 0 else int(np.random.default_rng([i, attempt]).integers(len(self)))

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < len(self):
            raise IndexError(f"sample id {i} outside [0, {len(self)})")
        skipped: list[BadSample] = []
        for attempt in range(self.max_substitutes + 1):
            j = self.substitute(i, attempt)
            try:
                image, caption = self.load(j)
            except BadSampleError as error:
                skipped.append(BadSample(j, error.kind, error.detail))
                continue
            return Sample(j, self.transform(image), self.tokenize([caption])[0], tuple(skipped))
        raise BadSampleError(
            "too_many_bad",
            f"sample {i} and {self.max_substitutes} substitutes are all bad: {[(b.id, b.kind) for b in skipped]}",
        )


class CsvPairs(PairDataset):
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

    def load(self, i: int) -> tuple[Image.Image, str]:
        image_path, caption = self.pairs[i]
        return _load_image(image_path), _checked_caption(caption)


class WebDatasetPairs(PairDataset):
    """Random access over uncompressed webdataset .tar shards (key.png|.jpg|.jpeg|.webp + key.txt per sample),
    img2dataset's output as it writes it included.

    The member index (byte offsets) is built once at construction by reading the tar headers. Sample id = ordinal
    of the sample's key across the shards in the given order, keys sorted within a shard: the same shards give the
    same ids in every epoch, worker and resume, and shards appended to the list leave the earlier ids as they were.
    `key(i)` is the sample's key (img2dataset's `key`). `census` says what img2dataset left out of the shards;
    it is logged here. File handles are opened lazily per process, so the data set can be passed to DataLoader
    workers.
    """

    def __init__(self, shards: str | Sequence[str], transform: Transform, tokenize: Tokenize):
        self.shards = expand_shards(shards)
        if not self.shards:
            raise ValueError(f"no webdataset shards in {shards!r}")
        self.samples, self.census = index_shards(self.shards)
        self.transform = transform
        self.tokenize = tokenize
        self._files: dict[int, io.BufferedReader] = {}
        self._pid = os.getpid()
        log.log(logging.WARNING if self.census.missing else logging.INFO, "shards: %s", self.census.describe())

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = {}  # handles don't survive pickling into workers
        return state

    def _read(self, member: Member) -> bytes:
        if self._pid != os.getpid():  # forked worker: never share a file position with the parent
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(member.shard)
        if f is None:
            f = self._files[member.shard] = open(self.shards[member.shard], "rb")
        f.seek(member.offset)
        return f.read(member.size)

    def key(self, i: int) -> str:
        return self.samples[i].key

    def caption(self, i: int) -> str:
        return self._read(self.samples[i].caption).decode("utf-8")

    def load(self, i: int) -> tuple[Image.Image, str]:
        sample = self.samples[i]
        try:
            caption = self._read(sample.caption).decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadSampleError("unreadable_caption", str(error)) from None
        return _load_image(io.BytesIO(self._read(sample.image))), _checked_caption(caption)

    def describe(self) -> dict:
        return self.census.to_dict()

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
    pairs = collate_pairs(batch)
    return pairs.ids, pairs.images, pairs.tokens


@dataclass
class PairBatch:
    """A collated batch: what a DataLoader with `collate_fn=collate_pairs` yields.

    ids[b] is the sample id of row b (a substitute's own id where a bad sample was stepped over); `skipped`
    lists those bad samples, for `BadSampleLedger`.
    """

    ids: torch.Tensor  # [B] int64
    images: torch.Tensor  # [B, 3, H, W]
    tokens: torch.Tensor  # [B, L] int64
    skipped: list[BadSample] = field(default_factory=list)
    # How the batch was composed (a BatchLayout) when it came from hard_pair_loader; None otherwise.
    layout: Any = None

    def __len__(self) -> int:
        return len(self.ids)

    def pin_memory(self) -> PairBatch:  # DataLoader(pin_memory=True) calls this on custom batch types
        return replace(
            self, ids=self.ids.pin_memory(), images=self.images.pin_memory(), tokens=self.tokens.pin_memory()
        )


def collate_pairs(batch: Sequence[Sample]) -> PairBatch:
    """Stack samples ((id, image, tokens) each; a Sample also brings its `skipped`) into a PairBatch."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    return PairBatch(
        ids=torch.tensor([sample[0] for sample in batch], dtype=torch.long),
        images=torch.stack([sample[1] for sample in batch]),
        tokens=torch.stack([sample[2] for sample in batch]),
        skipped=[bad for sample in batch for bad in getattr(sample, "skipped", ())],
    )
