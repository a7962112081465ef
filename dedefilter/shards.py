"""WebDataset shards: build them from arrays, and read them so that no sample goes missing.

webdataset's own tar reader hands a broken member to an exception handler without its key, so a
truncated shard silently loses samples. :func:`tar_samples` groups members by key the same way
(``dir/key.ext``) but turns whatever cannot be read into a sample carrying ``__error__``, which the
filter records as an ``error`` row.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds

from .data import decode_image, encode_png

log = logging.getLogger(__name__)


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``), webdataset's grouping rule."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


def read_shard(url: str) -> Iterator[dict]:
    """Yield the samples of one tar shard; unreadable ones as ``{__key__, __url__, __error__}``.

    A shard that cannot be opened yields one error sample with key ``None``; after a read error the
    rest of the shard is unreachable (tar is sequential), so reading stops there.
    """
    current: dict | None = None
    try:
        with wds.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                if not member.isreg():
                    continue
                key, ext = split_member_name(member.name)
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                current[ext] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        reason = f"unreadable tar data ({type(err).__name__}: {err}); rest of shard skipped"
        key = current["__key__"] if current is not None else None
        current = None
        yield {"__key__": key, "__url__": url, "__error__": reason}
    if current is not None:
        yield current


def tar_samples(sources: Iterable[dict]) -> Iterator[dict]:
    """webdataset stage: ``{"url": ...}`` shard descriptions in, samples out."""
    for source in sources:
        yield from read_shard(source["url"])


def shard_pipeline(urls: list[str], *stages) -> wds.DataPipeline:
    """Shards split over ranks and DataLoader workers, read with :func:`tar_samples`, then ``stages``."""
    return wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker,
                            tar_samples, *stages)


def write_image_shards(directory: str | Path, images: np.ndarray, keys: list[str], labels: np.ndarray,
                       meta: list[dict] | None = None, shard_size: int = 1000, prefix: str = "shard") -> list[str]:
    """Write uint8 images as ``{key}.png`` + ``.cls`` (+ ``.json``) WebDataset shards; returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pattern = str(directory / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as writer:
        for i, key in enumerate(keys):
            sample = {"__key__": key, "png": encode_png(images[i]), "cls": int(labels[i])}
            if meta is not None:
                sample["json"] = json.dumps(meta[i]).encode()
            writer.write(sample)
    return [pattern % i for i in range(-(-len(keys) // shard_size))]


def decode_shards(urls: list[str], limit: int | None = None, size: int = 32,
                  fields: tuple[str, ...] = ("png", "jpg", "jpeg", "webp")) -> np.ndarray:
    """Decode up to ``limit`` images from shards into (N, size, size, 3) uint8 (for training/calibration).

    Unreadable samples are skipped with a logged reason.
    """
    images = []
    for sample in tar_samples({"url": url} for url in urls):
        if limit is not None and len(images) >= limit:
            break
        data = next((sample[f] for f in fields if f in sample), None)
        try:
            if "__error__" in sample or data is None:
                raise ValueError(sample.get("__error__", "no image field"))
            images.append(decode_image(data, size))
        except ValueError as err:
            log.warning("skipping %s from %s: %s", sample.get("__key__"), sample.get("__url__"), err)
    if not images:
        raise ValueError(f"no decodable images in {urls}")
    return np.stack(images)
