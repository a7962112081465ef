"""WebDataset shards: build them from arrays, and read them so that no sample goes missing.

webdataset's own tar reader hands a broken member to an exception handler without its key, and
Python's tarfile silently ends an archive at the first header that fails its checksum, so a damaged
shard loses samples without a word. :func:`read_shard` groups members by key the same way
(``dir/key.ext``) but turns whatever cannot be read into a sample carrying ``__error__``, which the
filter records as an ``error`` row. The accounting: every sample (key group) the reader sees is one
row; an unreadable rest of a shard (or a shard that cannot be opened) is one error row with key
``None`` and the shard's url.
"""

from __future__ import annotations

import json
import logging
import tarfile
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds

from .data import decode_image, encode_png

log = logging.getLogger(__name__)
MAX_MEMBER_BYTES = 256 << 20  # a member claiming more is not read (a corrupt size field must not exhaust memory)


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``), webdataset's grouping rule."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


class Recorder:
    """Reads through to a stream and keeps its last chunks, so the bytes from where tarfile stopped
    (an end-of-archive block, or a header it could not parse) can be examined afterwards."""

    def __init__(self, stream):
        self.stream = stream
        self.position = 0
        self.recent: deque[tuple[int, bytes]] = deque(maxlen=16)  # tarfile reads 10 KiB at a time

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.recent.append((self.position, data))
        self.position += len(data)
        return data

    def since(self, offset: int) -> bytes:
        """The bytes already read from ``offset`` on (those still in the window)."""
        return b"".join(data[max(0, offset - start):] for start, data in self.recent if start + len(data) > offset)


def tail_problem(archive: tarfile.TarFile, recorder: Recorder) -> str | None:
    """Why the rest of a stream after tarfile's last member is not a clean end of archive, or None.

    A clean end is at least one zero block and nothing but zeros after it. Only uncompressed tars are
    checked byte for byte; for compressed ones the decompressed rest is checked.
    """
    offset = archive.offset
    if archive.fileobj.comptype == "tar":
        head, more = recorder.since(offset), recorder.read
    else:
        head, more = b"", archive.fileobj.read
    size, nonzero = len(head), bool(head.strip(b"\0"))
    while chunk := more(1 << 20):
        size += len(chunk)
        nonzero = nonzero or bool(chunk.strip(b"\0"))
    if nonzero:
        return f"unreadable tar data from byte {offset} ({size} bytes that are not a tar member); rest of shard skipped"
    if size == 0 and archive.fileobj.comptype == "tar":
        return f"tar ends at byte {offset} without an end-of-archive block: the shard is truncated"
    return None


def utf8_key(key: str) -> tuple[str, str | None]:
    """tarfile decodes names with surrogate escapes; Parquet needs valid UTF-8."""
    try:
        key.encode("utf-8")
        return key, None
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), "member name is not valid UTF-8"


def read_shard(url: str) -> Iterator[dict]:
    """Yield the samples of one tar shard; unreadable ones as ``{__key__, __url__, __error__}``.

    A shard that cannot be opened yields one error sample with key ``None``; after a read error the
    rest of the shard is unreachable (tar is sequential), so reading stops there. A key seen again in
    the same shard (or a member name repeated) starts a new sample marked as a duplicate: the first
    occurrence is scored, later ones are error rows.
    """
    current: dict | None = None
    group = None  # the raw member-name stem of the current sample
    seen: set[str] = set()
    tail = None
    try:
        with wds.gopen(url, "rb") as stream:
            recorder = Recorder(stream)
            with tarfile.open(fileobj=recorder, mode="r|*") as archive:
                for member in archive:
                    if not member.isreg():
                        continue
                    stem, ext = split_member_name(member.name)
                    if current is None or group != stem or ext in current:
                        if current is not None:
                            yield current
                        group = stem
                        key, problem = utf8_key(stem)
                        if key in seen:
                            problem = f"duplicate key {key!r}: seen before in this shard, only the first is scored"
                        seen.add(key)
                        current = {"__key__": key, "__url__": url} | ({"__error__": problem} if problem else {})
                    if member.size > MAX_MEMBER_BYTES or ext.startswith("__"):
                        current["__error__"] = (f"member {member.name!r} is {member.size} bytes (limit {MAX_MEMBER_BYTES})"
                                                if member.size > MAX_MEMBER_BYTES else
                                                f"member {member.name!r} uses a reserved field name")
                        continue
                    current[ext] = archive.extractfile(member).read()
                tail = tail_problem(archive, recorder)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        reason = f"unreadable tar data ({type(err).__name__}: {err}); rest of shard skipped"
        key = current["__key__"] if current is not None else None
        current = None
        yield {"__key__": key, "__url__": url, "__error__": reason}
    if current is not None:
        yield current
    if tail is not None:
        yield {"__key__": None, "__url__": url, "__error__": tail}


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
