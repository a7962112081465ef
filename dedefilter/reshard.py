"""Apply a key list to WebDataset shards: new shards without those keys, with counts.

The resharder of "score once, select many": a selection (``audit.select_keys``) is a sorted key list,
and this writes one output shard per input shard (same name) holding every other sample byte for byte.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import webdataset as wds

from .shards import read_shard


@dataclass
class ReshardCounts:
    read: int = 0  # samples read from the input shards
    kept: int = 0  # written to the output shards
    removed: int = 0  # in the key list, left out
    unreadable: int = 0  # could not be read (see the logged reason), so could not be written
    keys_not_found: int = 0  # keys in the list that no input shard held

    def to_dict(self) -> dict:
        return asdict(self)


def read_keys(path: str | Path) -> set[str]:
    """One key per line (blank lines ignored)."""
    return {line.strip() for line in Path(path).read_text().splitlines() if line.strip()}


def reshard(urls: list[str], drop: set[str], out_dir: str | Path) -> ReshardCounts:
    """Copy ``urls`` to ``out_dir`` without the samples whose key is in ``drop``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [Path(url).name for url in urls]
    if len(set(names)) != len(names):
        raise ValueError("input shards share file names; reshard them into separate --out folders")
    counts, seen = ReshardCounts(), set()
    for url, name in zip(urls, names, strict=True):
        with wds.TarWriter(str(out / name)) as writer:
            for sample in read_shard(url):
                counts.read += 1
                if "__error__" in sample:
                    counts.unreadable += 1
                    print(f"reshard: skipped unreadable sample {sample['__key__']} in {url}: {sample['__error__']}")
                    continue
                if sample["__key__"] in drop:
                    counts.removed += 1
                    seen.add(sample["__key__"])
                    continue
                counts.kept += 1
                writer.write({k: v for k, v in sample.items() if k != "__url__"})
    counts.keys_not_found = len(drop - seen)
    return counts
