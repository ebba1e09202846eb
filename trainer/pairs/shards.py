"""Webdataset shards indexed from their tar headers, and the samples that img2dataset left out of them.

A sample is the tar members that share a key (webdataset's rule: the member's name up to the first dot of its
base name): an image (.png/.jpg/.jpeg/.webp) and a .txt caption; other members (.json, .id, ...) are ignored.
Samples are ordered by key within each shard, not by where they lie in the tar: img2dataset's download threads
finish in any order and write in that order, so two downloads of one URL list give the same ids only this way.

img2dataset's webdataset output, as it writes it:

    DIR/00000.tar           000000.jpg 000000.txt 000000.json  000002.jpg ...   (failed downloads are absent)
    DIR/00000_stats.json    {"count": 8, "successes": 7, "failed_to_download": 1, "failed_to_resize": 0,
                             "status_dict": {"success": 7, "HTTP Error 404: File not found": 1}, ...}
    DIR/00000.parquet       one row per URL: key, url, caption, status, error_message, ...

A key is the shard number followed by the row's place in that shard, both zero-padded ("00001" + "3"), so keys
are unique across the whole output and a failed download leaves a gap in them. What is missing from each shard
is read from its `_stats.json` when it is there (exact, with img2dataset's error messages); without it, from the
gaps in its keys (a lower bound: failures after a shard's last success leave no gap). Missing samples are never
met in training, so they are reported (`ShardCensus`), not counted as bad samples.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# img2dataset's two kinds of failure (a URL that did not download, an image it could not decode or resize), and
# ours for a shard without stats; the stats' "status_dict" gives the error messages behind them.
STATS_FAILURES = ("failed_to_download", "failed_to_resize")
KEY_GAP = "key_gap"
NOT_IN_TAR = "not_in_tar"  # the stats count a success that the tar does not hold (a truncated or edited shard)


@dataclass(frozen=True, slots=True)
class Member:
    """Where one tar member's bytes lie: shard index, byte offset of the data and its size."""

    shard: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class ShardSample:
    key: str
    image: Member
    caption: Member


@dataclass(frozen=True)
class ShardCensus:
    """What a list of shards holds, and what is missing from it: `samples` is the data set's size; `missing`
    counts by kind (failed_to_download, failed_to_resize, not_in_tar; key_gap for shards without stats) and
    `errors` by img2dataset's error message."""

    shards: int
    samples: int
    missing: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    shards_without_stats: int = 0

    @property
    def n_missing(self) -> int:
        return sum(self.missing.values())

    @property
    def attempted(self) -> int:
        """The samples the shards were meant to hold (img2dataset's URLs for them)."""
        return self.samples + self.n_missing

    def __add__(self, other: ShardCensus) -> ShardCensus:
        return ShardCensus(
            self.shards + other.shards,
            self.samples + other.samples,
            self.missing + other.missing,
            self.errors + other.errors,
            self.shards_without_stats + other.shards_without_stats,
        )

    def describe(self) -> str:
        """One line for the run's log: how many of how many samples are missing, and why."""
        held = f"{self.samples} samples in {self.shards} shards"
        if not self.missing:
            return held + ("" if self.shards_without_stats else ", none missing (img2dataset's stats)")
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.missing.items()))
        line = f"{self.n_missing} of {self.attempted} samples in these shards failed to download ({kinds})"
        if self.errors:
            line += "; " + ", ".join(f"{message!r} x{n}" for message, n in self.errors.most_common(5))
        if self.missing[KEY_GAP]:
            line += f"; {self.shards_without_stats} shards have no _stats.json, so their key gaps are a lower bound"
        return f"{line}; training on the other {held}"

    def to_dict(self) -> dict:
        return {
            "shards": self.shards,
            "samples": self.samples,
            "attempted": self.attempted,
            "missing": self.n_missing,
            "missing_by_kind": dict(self.missing),
            "errors": dict(self.errors),
            "shards_without_stats": self.shards_without_stats,
        }


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """A brace pattern ("dir/shard-{000000..000009}.tar"), a '::'-joined list, or a list, as an ordered list."""
    if isinstance(shards, (str, os.PathLike)):
        import braceexpand  # a webdataset dependency; imported here so CSV-only users don't need it

        return [s for part in str(shards).split("::") for s in braceexpand.braceexpand(part)]
    return [str(s) for s in shards]


def index_shards(shards: list[str]) -> tuple[list[ShardSample], ShardCensus]:
    """Every sample of the shards, in shard order then key order, and what img2dataset left out of them."""
    samples: list[ShardSample] = []
    census = ShardCensus(0, 0)
    for shard_index, shard in enumerate(shards):
        found = _index_shard(shard, shard_index)
        samples.extend(found)
        census += _shard_census(Path(shard), [s.key for s in found])
    return samples, census


def _index_shard(shard: str, shard_index: int) -> list[ShardSample]:
    if not Path(shard).is_file():
        raise FileNotFoundError(f"webdataset shard not found: {shard}")
    groups: dict[str, dict[str, Member]] = {}
    with tarfile.open(shard, "r:") as tar:  # "r:" = uncompressed only: random access needs plain offsets
        for info in tar:
            if not info.isfile():
                continue
            directory, _, base = info.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            key = f"{directory}/{stem}" if directory else stem
            groups.setdefault(key, {})[ext.lower()] = Member(shard_index, info.offset_data, info.size)
    samples = []
    for key in sorted(groups):
        members = groups[key]
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if image is None or "txt" not in members:
            raise ValueError(
                f"{shard}: sample {key!r} needs an image ({'/'.join(IMAGE_EXTENSIONS)}) and a .txt caption, "
                f"has {sorted(members)}"
            )
        samples.append(ShardSample(key, image, members["txt"]))
    return samples


def stats_path(shard: Path) -> Path:
    """Where img2dataset writes a shard's stats: `DIR/00000.tar` -> `DIR/00000_stats.json`."""
    return shard.with_name(f"{shard.stem}_stats.json")


def _shard_census(shard: Path, keys: list[str]) -> ShardCensus:
    stats = _read_stats(stats_path(shard))
    if stats is None:
        gaps = +Counter({KEY_GAP: _key_gaps(shard.stem, keys)})  # unary +: drops a zero count
        return ShardCensus(1, len(keys), gaps, shards_without_stats=1)
    missing = Counter({kind: int(stats.get(kind, 0)) for kind in STATS_FAILURES})
    missing[NOT_IN_TAR] = max(0, int(stats.get("successes", len(keys))) - len(keys))
    errors = Counter({m: int(n) for m, n in stats.get("status_dict", {}).items() if m != "success"})
    return ShardCensus(1, len(keys), +missing, +errors)


def _read_stats(path: Path) -> dict | None:
    """A shard's img2dataset stats; None when there are none. Unreadable stats are logged, not fatal: the tar
    itself is what is trained on."""
    if not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        log.warning("%s: unreadable img2dataset stats (%s); counting the shard's key gaps instead", path, error)
        return None
    return stats if isinstance(stats, dict) else None


def _key_gaps(stem: str, keys: list[str]) -> int:
    """Rows missing before a shard's last present key, for img2dataset's keys (the shard's name, then the row's
    place in it); 0 for keys of any other form."""
    if not stem.isdigit() or not keys:
        return 0
    places = {int(key[len(stem) :]) for key in keys if key.startswith(stem) and key[len(stem) :].isdigit()}
    if len(places) != len(keys):
        return 0
    return max(places) + 1 - len(places)
