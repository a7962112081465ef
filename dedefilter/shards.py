"""WebDataset shards: build them from arrays, and read them so that no sample goes missing.

webdataset's own tar reader hands a broken member to an exception handler without its key, and
Python's tarfile silently ends an archive at the first header that fails its checksum, so a damaged
shard loses samples without a word. :func:`read_shard` groups members by key the same way
(``dir/key.ext``) but steps over a damaged header to the next valid one (as GNU tar does) and turns
whatever cannot be read into a sample carrying ``__error__``, which the filter records as an
``error`` row. The accounting: every sample (key group) the reader sees is one row; skipped bytes are
charged to the sample whose header was damaged (if its name is readable) or are an error row with key
``None``, as is a shard of which nothing can be read.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import re
import tarfile
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds

from .data import decode_image, encode_png
from .guard import is_local

log = logging.getLogger(__name__)
BLOCK = tarfile.BLOCKSIZE
CANNOT_READ = "cannot read shard"
HEAD = 8 * BLOCK  # bytes kept from the start of a skipped stretch, to name the damaged member
MAX_MEMBER_BYTES = 256 << 20  # a member claiming more is not read (a corrupt size field must not exhaust memory)


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``), webdataset's grouping rule."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


class Watcher:
    """Reads through to a (decompressed) tar stream and watches the bytes from one offset on: the first
    non-zero byte there, and the first few blocks there (a header, if readable), in a bounded window.

    tarfile (with ``ignore_zeros``) steps over blocks that are not a valid header one by one without a
    word; the reader watches the stretch after each member's data, so the next member starting later
    than expected, with non-zero bytes in between, is a skip it can name.
    """

    def __init__(self, stream):
        self.stream = stream
        self.position = 0
        self.recent: deque[tuple[int, bytes]] = deque(maxlen=16)  # tarfile reads 10 KiB at a time
        self.start = 0  # the watched offset
        self.first_nonzero: int | None = None
        self.head = b""  # the first bytes from ``start`` on (a header, and any extended header before it)

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.recent.append((self.position, data))
        self.look(self.position, data)
        self.position += len(data)
        return data

    def look(self, position: int, data: bytes) -> None:
        if position + len(data) <= self.start:
            return
        data = data[max(0, self.start - position):]
        position = max(position, self.start)
        if len(self.head) < HEAD and position == self.start + len(self.head):
            self.head += data[:HEAD - len(self.head)]
        if self.first_nonzero is None:
            for begin in (0, BLOCK):  # a header usually starts right there: look at one block before the rest
                part = data[begin:BLOCK] if begin == 0 else data[BLOCK:]
                if rest := part.lstrip(b"\0"):
                    self.first_nonzero = position + begin + len(part) - len(rest)
                    break

    def watch(self, offset: int) -> None:
        """Start watching at ``offset`` (bytes already read from there on are looked at now)."""
        self.start, self.first_nonzero, self.head = offset, None, b""
        for position, data in self.recent:
            self.look(position, data)

    def skipped(self, until: int) -> bool:
        """Whether non-zero bytes lie between the watched offset and ``until`` (zero blocks are tar padding)."""
        return self.first_nonzero is not None and self.first_nonzero < until


class Prefixed:
    """A stream with its first bytes (read to sniff the compression) put back."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data if len(data) == size else data + self.stream.read(size - len(data))


COMPRESSIONS = ((b"\x1f\x8b\x08", lambda f: gzip.GzipFile(fileobj=f, mode="rb")), (b"BZh91", bz2.BZ2File),
                (b"\xfd7zXZ", lzma.LZMAFile))  # tarfile's own magic numbers for r|*


class ResyncingTarInfo(tarfile.TarInfo):
    """tarfile steps over a bad header with ``ignore_zeros``, but not over a bad one right after an
    extended (pax / GNU long name) header: make that one a bad header too."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.SubsequentHeaderError as err:
            raise tarfile.InvalidHeaderError(str(err)) from err


def decompressed(stream):
    """The tar bytes of a plain, gzip, bzip2 or xz stream, read forward only (offsets are tar offsets)."""
    head = stream.read(6)
    prefixed = Prefixed(head, stream)
    return next((opener(prefixed) for magic, opener in COMPRESSIONS if head.startswith(magic)), prefixed)


def damaged_name(head: bytes) -> str | None:
    """The member name in a header that failed its checksum, if the block still reads as a header.

    ``head`` is the skipped stretch's first blocks: an intact extended header (pax, GNU long name) there
    is followed to the name it gives or to the damaged header after it.
    """
    block = head[:BLOCK]
    if block[257:262] != b"ustar" and not re.fullmatch(rb"[0-7 \0]{8}", block[100:108]):
        return None  # not a header at all (member data, random bytes)
    name, prefix = (field.split(b"\0", 1)[0] for field in (block[:100], block[345:500]))
    kind = block[156:157]
    if kind in (b"x", b"g", b"L"):
        try:
            size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            return None
        data, after = head[BLOCK:BLOCK + size], head[BLOCK + -(-size // BLOCK) * BLOCK:]
        if kind == b"L":
            name, prefix = data.split(b"\0", 1)[0], b""
        elif found := re.search(rb"(?:^|\n)\d+ path=([^\n]*)\n", data):
            name, prefix = found.group(1), b""
        else:
            return damaged_name(after) if len(after) >= BLOCK else None
    if block[257:262] == b"ustar" and prefix:
        name = prefix + b"/" + name
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() and text and not text.startswith("././@") else None


def skip_reason(start: int, end: int, name: str | None, to_the_end: bool) -> str:
    what = f"a damaged header of member {name!r}" if name else "a damaged header or bytes that are not a tar member"
    after = "no valid header after them" if to_the_end else "reading went on at the next valid header"
    return f"skipped tar bytes {start}-{end}{' (the rest of the shard)' if to_the_end else ''}: {what}; {after}"


def utf8_key(key: str) -> tuple[str, str | None]:
    """tarfile decodes names with surrogate escapes; Parquet needs valid UTF-8."""
    try:
        key.encode("utf-8")
        return key, None
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), "member name is not valid UTF-8"


def missing_shards(urls: Iterable[str]) -> list[str]:
    """The local shard paths that do not exist (remote ones are only known missing when read)."""
    return [url for url in urls if is_local(url) and not Path(url).exists()]


def require_shards(urls: list[str]) -> None:
    """Refuse a run whose local inputs are missing, before any work (a brace pattern can match nothing)."""
    if not urls:
        raise ValueError("no input shards given")
    if missing := missing_shards(urls):
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} input shards do not exist: {listed}; check the paths "
                                "(a brace pattern is expanded as written, whether or not the files exist)")


def unreadable(sample: dict) -> bool:
    """Whether a reader sample says nothing of its shard could be read (missing, not a file, no tar data)."""
    return sample["__key__"] is None and sample.get("__error__", "").startswith(CANNOT_READ)


def read_shard(url: str) -> Iterator[dict]:
    """Yield the samples of one tar shard; unreadable ones as ``{__key__, __url__, __error__}``.

    A shard of which nothing can be read yields one error sample with key ``None`` (:func:`unreadable`).
    A header that fails its checksum is stepped over to the next valid header (as GNU tar does), and
    what was skipped is an error: on the sample the damaged member belongs to if its name is readable
    (that sample is not scored), else a sample of its own with key ``None``. After an error inside a
    member's data (a truncated file, a corrupt compressed stream) reading stops there. A key seen again
    in the same shard (or a member name repeated) starts a new sample marked as a duplicate: the first
    occurrence is scored, later ones are error rows.
    """
    current: dict | None = None
    group = None  # the raw member-name stem of the current sample
    seen: set[str] = set()
    skip: tuple[str, str] | None = None  # a skip to charge to the next sample if it has this key: (raw stem, reason)
    tail = None
    members = 0

    def skip_row() -> dict:
        return {"__key__": utf8_key(skip[0])[0], "__url__": url, "__error__": skip[1]}

    def charge(end: int, to_the_end: bool) -> Iterator[dict]:
        """Charge the stretch skipped before ``end`` to the sample being read if the damaged member is
        one of its own, to the next sample if that has the damaged member's key, else to a row of its own."""
        nonlocal skip
        name = damaged_name(watcher.head)
        stem = split_member_name(name)[0] if name else None
        reason = skip_reason(watcher.start, end, name, to_the_end)
        if current is not None and stem == group:
            current["__error__"] = reason
        elif stem is None:
            yield {"__key__": None, "__url__": url, "__error__": reason}
        else:
            skip = (stem, reason)

    try:
        with wds.gopen(url, "rb") as stream:
            watcher = Watcher(decompressed(stream))
            with tarfile.open(fileobj=watcher, mode="r|", ignore_zeros=True,
                              tarinfo=ResyncingTarInfo) as archive:
                for member in archive:
                    members += 1
                    if watcher.skipped(member.offset):
                        yield from charge(member.offset, to_the_end=False)
                    watcher.watch(archive.offset)  # where the next header should start
                    if not member.isreg():
                        continue
                    stem, ext = split_member_name(member.name)
                    if current is None or group != stem or ext in current or skip is not None:
                        if current is not None:
                            yield current
                        if skip is not None and skip[0] != stem:
                            yield skip_row()
                            skip = None
                        group = stem
                        key, problem = utf8_key(stem)
                        if key in seen:
                            problem = f"duplicate key {key!r}: seen before in this shard, only the first is scored"
                        seen.add(key)
                        if skip is not None:  # the rest of a sample whose first member's header was damaged
                            problem, skip = skip[1], None
                        current = {"__key__": key, "__url__": url} | ({"__error__": problem} if problem else {})
                    if member.size > MAX_MEMBER_BYTES or ext.startswith("__"):
                        current["__error__"] = (f"member {member.name!r} is {member.size} bytes (limit {MAX_MEMBER_BYTES})"
                                                if member.size > MAX_MEMBER_BYTES else
                                                f"member {member.name!r} uses a reserved field name")
                        continue
                    current[ext] = archive.extractfile(member).read()
                end = watcher.position
                if watcher.skipped(end):
                    yield from charge(end, to_the_end=True)
                elif end == watcher.start and end > 0:
                    tail = f"tar ends at byte {end} without an end-of-archive block: the shard is truncated"
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        reason = (f"unreadable tar data ({type(err).__name__}: {err}); rest of shard skipped" if members else
                  f"{CANNOT_READ} ({type(err).__name__}: {err})")
        if skip is not None:
            yield skip_row()
            skip = None
        yield {"__key__": current["__key__"] if current is not None else None, "__url__": url, "__error__": reason}
        current = None
    if current is not None:
        yield current
    if skip is not None:
        yield skip_row()
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
