"""Apply a key list to WebDataset shards: new shards without those keys, with counts.

The resharder of "score once, select many": a selection (``audit.select``) is a sorted key list, and
this writes one output shard per input shard (same name) holding every other sample byte for byte.
It guards the inputs: every input must exist, the output folder may not overlap them, each output is
written under a hidden name and published (renamed) only when every shard is done and every listed key
was found, so a failed run leaves no output shard behind.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import webdataset as wds

from .guard import is_local, refuse_overlap
from .shards import read_shard, require_shards

SHOWN = 5  # keys named in an error message


class KeysNotFound(ValueError):
    """Listed keys that no input shard held: the list and the shards do not match."""


@dataclass
class ReshardCounts:
    read: int = 0  # samples read from the input shards
    kept: int = 0  # written to the output shards
    removed: int = 0  # in the key list, left out
    unreadable: int = 0  # could not be read (each one's reason goes to stderr), so could not be written
    keys_not_found: int = 0  # keys in the list that no input shard held

    def to_dict(self) -> dict:
        return asdict(self)


def check_paths(urls: list[str], out: Path, overwrite: bool) -> list[str]:
    """Refuse missing inputs, an output folder that overlaps them, and (without ``overwrite``) existing outputs."""
    require_shards(urls)
    refuse_overlap(out, [url for url in urls if is_local(url)])
    names = [Path(url).name for url in urls]
    if len(set(names)) != len(names):
        raise ValueError("input shards share file names; reshard them into separate --out folders")
    existing = [name for name in names if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {len(existing)} of the output shards ({existing[:SHOWN]}): "
                              "choose an empty --out folder, or pass --overwrite to replace those files")
    return names


def reshard(urls: list[str], drop: set[str], out_dir: str | Path, allow_missing_keys: bool = False,
            overwrite: bool = False) -> ReshardCounts:
    """Copy ``urls`` to ``out_dir`` without the samples whose key is in ``drop``.

    Raises ``KeysNotFound`` (publishing nothing) when a listed key is in no shard, unless
    ``allow_missing_keys`` (a list made from more shards than these).
    """
    out = Path(out_dir)
    names = check_paths(urls, out, overwrite)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    temps = [out / f".{name}.tmp-{os.getpid()}" for name in names]
    counts, seen = ReshardCounts(), set()
    try:
        for url, temp in zip(urls, temps, strict=True):
            with wds.TarWriter(str(temp)) as writer:
                for position, sample in enumerate(read_shard(url)):
                    counts.read += 1
                    if position == 0 and sample["__key__"] is None and "__error__" in sample:
                        raise OSError(f"cannot read shard {url} from its start: {sample['__error__']}; "
                                      "nothing written")
                    if "__error__" in sample:
                        counts.unreadable += 1
                        seen.add(sample["__key__"])
                        print(f"reshard: unreadable sample {sample['__key__']!r} in {url} not copied: "
                              f"{sample['__error__']}", file=sys.stderr)
                        continue
                    if sample["__key__"] in drop:
                        counts.removed += 1
                        seen.add(sample["__key__"])
                        continue
                    counts.kept += 1
                    writer.write({k: v for k, v in sample.items() if k != "__url__"})
        missing = drop - seen
        counts.keys_not_found = len(missing)
        if missing and not allow_missing_keys:
            raise KeysNotFound(f"{len(missing)} of the {len(drop)} listed keys are in none of the {len(urls)} input "
                               f"shards (e.g. {sorted(missing)[:SHOWN]}); nothing written. Check that the key list "
                               "was selected from these shards' scores, or pass --allow-missing-keys")
        for temp, name in zip(temps, names, strict=True):
            os.replace(temp, out / name)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
        if made and not any(out.iterdir()):
            out.rmdir()  # a failed run leaves no trace
    return counts
