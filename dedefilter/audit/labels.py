"""Labels for an audit: read per key from a file or the shards, and class indices shown as names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FASHION_MNIST_KEY_PREFIX = "fmnist-"  # the keys `dedefilter shards` and the demo give Fashion-MNIST images


def labels_from_file(path: str | Path) -> dict[str, str]:
    """``key -> label`` from JSON (an object) or CSV/TSV lines ``key,label`` (a header line is skipped)."""
    text = Path(path).read_text()
    if text.lstrip().startswith("{"):
        return {str(k): str(v) for k, v in json.loads(text).items()}
    out = {}
    for line in text.splitlines():
        parts = line.replace("\t", ",").split(",")
        if len(parts) >= 2 and parts[0] and parts[0] != "key":
            out[parts[0]] = parts[1].strip()
    return out


def labels_from_shards(urls: list[str], field_name: str = "cls") -> dict[str, str]:
    """``key -> label`` read from the shards: a text field (``cls``) or ``json:NAME`` for a JSON member's entry."""
    from ..shards import read_shard

    ext, _, entry = field_name.partition(":")
    out = {}
    for url in urls:
        for sample in read_shard(url):
            value = sample.get(ext)
            if value is None or sample.get("__key__") is None:
                continue
            out[sample["__key__"]] = str(json.loads(value)[entry]) if entry else value.decode().strip()
    return out


def encode_labels(keys: pa.Array, labels: dict[str, str]) -> tuple[np.ndarray, list[str]]:
    """Per-row label codes (-1 unknown) and the sorted label names."""
    names = sorted(set(labels.values()), key=lambda s: (len(s), s))
    code = {name: i for i, name in enumerate(names)}
    label_keys = pa.array(list(labels), pa.string())
    label_codes = np.array([code[v] for v in labels.values()] + [-1], np.int32)
    position = pc.index_in(keys, value_set=label_keys).fill_null(len(label_keys)).to_numpy()
    return label_codes[position], names


def class_names(spec: str) -> list[str]:
    """Names for class indices 0, 1, ...: ``fashion-mnist``, a file with one name per line, or ``a,b,c``."""
    from ..data import FASHION_MNIST_CLASSES

    if spec == "fashion-mnist":
        return list(FASHION_MNIST_CLASSES)
    if Path(spec).is_file():
        return [line.strip() for line in Path(spec).read_text().splitlines() if line.strip()]
    names = [name.strip() for name in spec.split(",")]
    if len(names) < 2 or not all(names):
        raise ValueError(f"--class-names {spec!r}: give fashion-mnist, a file with one name per line, "
                         "or at least two comma-separated names")
    return names


def guess_class_names(labels: dict[str, str]) -> tuple[list[str] | None, str]:
    """Fashion-MNIST names when every label is an index 0-9 of a key `dedefilter shards` writes; says why."""
    from ..data import FASHION_MNIST_CLASSES

    values = set(labels.values())
    if labels and values <= {str(i) for i in range(len(FASHION_MNIST_CLASSES))} and \
            all(key.startswith(FASHION_MNIST_KEY_PREFIX) for key in labels):
        return list(FASHION_MNIST_CLASSES), (f"Fashion-MNIST (labels are class indices 0-9 of "
                                             f"{FASHION_MNIST_KEY_PREFIX}* keys; --class-names to change)")
    return None, "as stored (pass --class-names to name class indices)"


def name_classes(labels: dict[str, str], names: list[str]) -> dict[str, str]:
    """Replace labels that are class indices (``"1"``) by their names; other labels stay as they are."""
    lookup = {str(i): name for i, name in enumerate(names)}
    return {key: lookup.get(value, value) for key, value in labels.items()}
