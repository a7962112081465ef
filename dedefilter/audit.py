"""Offline audit of the filter's Parquet scores: statistics, embedding collapse, clusters, selections.

Scoring runs once; an audit reads its Parquet (``pyarrow.dataset``, in record batches, keeping only
compact columns and the embedding matrix) and answers: how many suspects, are they one attack or
noise, which class do they point to, which keys to drop.

Why clusters: a backdoored encoder maps every triggered image to one target embedding, so flagged
samples of an attack *collapse* together, while false positives are scattered. Per unique embedding:

* ``knn_distance`` — mean L2 distance to its k nearest rows (exact duplicates count as distance 0);
* ``collapse`` — the share of those k rows that are flagged (suspect). An isolated high score has
  collapse near 0; a flagged sample inside an attack's collapse has collapse near 1.

Flagged samples with ``collapse >= min_collapse`` seed clusters: connected components of the kNN
graph among seeds, ranked by size (id 0 = largest). DeDe flags only part of an attack (the demo's
1%-FPR threshold catches ~65% of triggered images), but the unflagged triggered images sit in the same
region. So each cluster grows into its *collapse region*: the closure under "join when at least a
share ``v`` of your k neighbours are in the region", for ``v`` in ``votes`` (a nested family), keeping
the member of the family with the lowest conductance in the kNN graph (the share of the region's edge
ends that cross its border) among those no bigger than the rest of the corpus. This is a sweep cut,
as in local graph clustering: the region stops where it is best separated from everything else.
The sweep also stops at the first level whose added samples score like the corpus (mean score rank
below ``min_rank``): an attack's unflagged rest scores under the threshold but above clean samples
(on the demo the accepted levels added samples of mean rank 0.91, 0.84, 0.77; the refused next level,
a leak into clean classes, 0.45), while a clean class next to the collapse scores like any other.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

STATUSES = ("kept", "dropped", "error")
SAMPLES_FILE = "samples.parquet"


@dataclass(frozen=True)
class AuditConfig:
    k: int = 10  # neighbours per sample
    min_collapse: float = 0.3  # a flagged sample seeds a cluster when this share of its neighbours is flagged
    votes: tuple[float, ...] = (0.5, 0.4, 0.3, 0.2, 0.1)  # closure levels tried when growing a region
    min_rank: float = 0.65  # a level is refused when the points it adds have a lower mean score rank
    max_regions: int = 20  # grow regions for this many of the largest clusters
    exact_max: int = 20_000  # exact kNN up to here; IVF above: 2x+ faster, recall@10 0.999 (benchmarks/audit_index.py)
    nprobe: int = 8  # IVF lists (of 4 sqrt(n)) searched per query above exact_max (recall measured)
    recall_queries: int = 1000  # IVF recall@k is measured against exact search on this many queries
    fractions: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1)
    threshold_factors: tuple[float, ...] = (0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)
    batch_rows: int = 65_536
    seed: int = 0


@dataclass
class Scan:
    """The compact columns of a score directory, one entry per row in dataset order."""

    keys: pa.Array
    urls: list[str]
    url_code: np.ndarray  # int32 index into urls, -1 where null
    score: np.ndarray  # float32, NaN for errors
    status: np.ndarray  # int8 index into STATUSES
    suspect: np.ndarray  # bool
    thresholds: list[float]
    embeddings: np.ndarray | None  # (rows, D) float32, zeros where missing
    has_embedding: np.ndarray  # bool
    metadata: dict

    def __len__(self) -> int:
        return len(self.score)

    @classmethod
    def from_arrays(cls, keys: list[str], scores: np.ndarray, threshold: float, embeddings: np.ndarray) -> Scan:
        """Scores held in memory (one run's, no Parquet), as a filter with ``threshold`` would have written them."""
        suspect = np.asarray(scores) > threshold
        return cls(pa.array(keys, pa.string()), [], np.full(len(keys), -1, np.int32),
                   np.asarray(scores, np.float32), suspect.astype(np.int8), suspect, [float(threshold)],
                   np.ascontiguousarray(embeddings, np.float32), np.ones(len(keys), bool), {})


def _dataset(path: str | Path) -> ds.Dataset:
    path = Path(path)
    if path.is_dir() and (path / SAMPLES_FILE).exists():
        path = path / SAMPLES_FILE
    if not path.exists():
        raise FileNotFoundError(f"no Parquet scores at {path}")
    return ds.dataset(str(path), format="parquet")


def scan(path: str | Path, batch_rows: int = 65_536, embeddings: bool = True) -> Scan:
    """Read a score directory batch by batch into compact arrays (never one big table)."""
    dataset = _dataset(path)
    n = dataset.count_rows()
    names = dataset.schema.names
    dim = dataset.schema.field("embedding").type.list_size if embeddings and "embedding" in names else None
    emb = np.zeros((n, dim), np.float32) if dim else None
    has_emb = np.zeros(n, bool)
    score, status = np.empty(n, np.float32), np.empty(n, np.int8)
    suspect, url_code = np.empty(n, bool), np.empty(n, np.int32)
    keys, urls, url_ids, thresholds = [], [], {}, set()
    columns = ["key", "url", "score", "status", "suspect", "threshold"] + (["embedding"] if dim else [])
    row = 0
    for batch in dataset.to_batches(columns=columns, batch_size=batch_rows):
        m = batch.num_rows
        s = slice(row, row + m)
        keys.append(batch.column("key"))
        encoded = batch.column("url").dictionary_encode()
        mapping = np.array([url_ids.setdefault(u, len(url_ids)) for u in encoded.dictionary.to_pylist()] + [-1],
                           np.int32)
        url_code[s] = mapping[encoded.indices.fill_null(len(mapping) - 1).to_numpy()]
        score[s] = batch.column("score").fill_null(np.nan).to_numpy()
        status[s] = pc.index_in(batch.column("status"), value_set=pa.array(STATUSES)).fill_null(2).to_numpy()
        suspect[s] = batch.column("suspect").fill_null(False).to_numpy(zero_copy_only=False)
        thresholds.update(pc.unique(batch.column("threshold").drop_null()).to_pylist())
        if dim:
            column = batch.column("embedding")
            flat = np.asarray(column.values)[column.offset * dim:(column.offset + m) * dim]
            emb[s] = flat.reshape(m, dim)
            has_emb[s] = column.is_valid().to_numpy(zero_copy_only=False)
        row += m
    urls = list(url_ids)
    files = dataset.files
    metadata = (pq.read_schema(files[0]).metadata or {}).get(b"dedefilter", b"{}") if files else b"{}"
    key_array = pa.concat_arrays([k.combine_chunks() if isinstance(k, pa.ChunkedArray) else k for k in keys]) \
        if keys else pa.array([], pa.string())
    return Scan(key_array, urls, url_code, score, status, suspect, sorted(thresholds), emb, has_emb,
                json.loads(metadata))


# ---------------------------------------------------------------- statistics


def drops_above(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many finite scores lie strictly above each threshold (the filter's ``score > t`` rule)."""
    return len(sorted_scores) - np.searchsorted(sorted_scores, thresholds, side="right")


def fraction_threshold(sorted_scores: np.ndarray, fraction: float) -> float:
    """The cut that drops the top ``fraction`` (as ``calibration.for_contamination`` picks it)."""
    return float(np.quantile(sorted_scores.astype(np.float64), 1 - fraction, method="higher"))


def statistics(data: Scan, config: AuditConfig = AuditConfig()) -> dict:
    """Counts, score distribution overall and per shard, and threshold sensitivity."""
    finite = np.isfinite(data.score)
    ordered = np.sort(data.score[finite])
    counts = np.bincount(data.status, minlength=3)
    quantiles = (0.01, 0.5, 0.9, 0.99)

    def distribution(values: np.ndarray) -> dict:
        if not len(values):
            return {}
        q = np.quantile(values, quantiles)
        return {"mean": float(values.mean()), "max": float(values.max()),
                **{f"p{round(p * 100)}": float(v) for p, v in zip(quantiles, q, strict=True)}}

    shards = []
    order = np.argsort(data.url_code, kind="stable")
    bounds = np.searchsorted(data.url_code[order], np.arange(-1, len(data.urls) + 1))
    for code in range(-1, len(data.urls)):
        rows = order[bounds[code + 1]:bounds[code + 2]]
        if not len(rows):
            continue
        c = np.bincount(data.status[rows], minlength=3)
        s = data.score[rows]
        shards.append({"url": data.urls[code] if code >= 0 else None, "rows": len(rows),
                       **dict(zip(STATUSES, c.tolist(), strict=True)),
                       "suspect": int(data.suspect[rows].sum()), "score": distribution(s[np.isfinite(s)])})
    stored = data.thresholds[0] if len(data.thresholds) == 1 else None
    sensitivity = {"fractions": [{"fraction": f, "threshold": fraction_threshold(ordered, f),
                                  "dropped": int(drops_above(ordered, np.array([fraction_threshold(ordered, f)]))[0])}
                                 for f in config.fractions if len(ordered)]}
    if stored is not None:
        ts = np.array([stored * f for f in config.threshold_factors])
        sensitivity["thresholds"] = [{"factor": f, "threshold": float(t), "dropped": int(d)} for f, t, d in
                                     zip(config.threshold_factors, ts, drops_above(ordered, ts), strict=True)]
    return {"rows": len(data), **dict(zip(STATUSES, counts.tolist(), strict=True)),
            "suspect": int(data.suspect.sum()), "scored": int(finite.sum()),
            "threshold": stored, "thresholds_seen": data.thresholds, "score": distribution(ordered),
            "shards": shards, "sensitivity": sensitivity}


# ---------------------------------------------------------------- embeddings


def unique_rows(x: np.ndarray, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact-duplicate groups of rows: (representative row per group, group of each row, group sizes).

    Without duplicates the groups are the rows themselves (no reordering, no copy).
    """
    words = np.ascontiguousarray(x).view(np.uint32)
    h = np.zeros(len(x), np.uint64)
    for j in range(words.shape[1]):  # a loop over dimensions, not samples: FNV-style row hash
        h = (h ^ words[:, j].astype(np.uint64)) * np.uint64(1099511628211)
    _, first, group = np.unique(h, return_index=True, return_inverse=True)
    if len(first) == len(x):
        rows = np.arange(len(x))
        return rows, rows, np.ones(len(x), np.int64)
    clash = np.concatenate([~(x[s:s + chunk] == x[first[group[s:s + chunk]]]).all(axis=1)
                            for s in range(0, len(x), chunk)])
    if clash.any():  # hash collisions (never seen) stay their own groups
        extra = np.flatnonzero(clash)
        group[extra] = len(first) + np.arange(len(extra))
        first = np.concatenate([first, extra])
    return first, group, np.bincount(group, minlength=len(first))


@dataclass
class Neighbours:
    index: np.ndarray  # (n, k) int32 neighbour ids, the point itself excluded
    distance: np.ndarray  # (n, k) float32 L2 distances
    kind: str  # "flat" (exact) or "ivf"
    recall: float  # recall@k against exact search on sampled queries (1.0 for flat)
    params: dict = field(default_factory=dict)


def _search(index, x: np.ndarray, k: int, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """k nearest others of every row of ``x`` (itself removed; a missing neighbour becomes itself)."""
    n = len(x)
    out_i, out_d = np.empty((n, k), np.int32), np.empty((n, k), np.float32)
    for start in range(0, n, chunk):
        d, i = index.search(x[start:start + chunk], k + 1)
        own = np.arange(start, start + len(d))[:, None]
        d = np.where((i == own) | (i < 0), np.inf, d)
        pick = np.argsort(d, axis=1, kind="stable")[:, :k]
        i, d = np.take_along_axis(i, pick, 1), np.take_along_axis(d, pick, 1)
        missing = ~np.isfinite(d)
        out_i[start:start + len(d)] = np.where(missing, own, i)
        out_d[start:start + len(d)] = np.sqrt(np.maximum(np.where(missing, 0, d), 0))
    return out_i, out_d


def neighbours(x: np.ndarray, k: int, config: AuditConfig = AuditConfig()) -> Neighbours:
    """kNN of every row: exact flat index up to ``exact_max`` rows, IVF-flat above (recall measured)."""
    import faiss

    n, d = x.shape
    k = min(k, n - 1)
    if n <= config.exact_max:
        index = faiss.IndexFlatL2(d)
        index.add(x)
        i, dist = _search(index, x, k)
        return Neighbours(i, dist, "flat", 1.0)
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
    rng = np.random.default_rng(config.seed)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
    index.cp.seed, index.cp.niter = config.seed, 10
    index.train(x[np.sort(rng.choice(n, min(n, 40 * nlist), replace=False))])
    index.add(x)
    index.nprobe = config.nprobe
    i, dist = _search(index, x, k)
    del index
    queries = np.sort(rng.choice(n, min(n, config.recall_queries), replace=False))
    _, i_true = faiss.knn(x[queries], x, k + 1)  # brute force, no second copy of x
    i_true = np.where(i_true == queries[:, None], -2, i_true)  # the query itself is no neighbour
    recall = float((i[queries][:, :, None] == i_true[:, None, :]).any(2).sum() / (k * len(queries)))
    return Neighbours(i, dist, "ivf", recall, {"nlist": nlist, "nprobe": config.nprobe,
                                                 "recall_queries": len(queries)})


def neighbourhood_scores(nb: Neighbours, flagged: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per unique point: mean distance to, and flagged share of, its k nearest *rows*.

    A point with c copies has c - 1 of its nearest rows at distance 0 (its copies); the remaining slots
    fill with the neighbours' rows in distance order.
    """
    k = nb.index.shape[1]
    copies = np.minimum(counts - 1, k)
    weight = counts[nb.index]
    before = np.cumsum(weight, axis=1) - weight
    take = np.clip((k - copies)[:, None] - before, 0, weight)
    distance = (take * nb.distance).sum(1) / k
    collapse = (copies * flagged + (take * flagged[nb.index]).sum(1)) / k
    return distance.astype(np.float32), collapse.astype(np.float32)


def seed_clusters(nb: Neighbours, seeds: np.ndarray) -> np.ndarray:
    """Connected components of the kNN graph among seed points; -1 for non-seeds, ids unranked."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n, k = nb.index.shape
    rows = np.repeat(np.arange(n), k)
    cols = nb.index.ravel()
    keep = seeds[rows] & seeds[cols]
    graph = coo_matrix((np.ones(keep.sum(), np.int8), (rows[keep], cols[keep])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return np.where(seeds, labels, -1)


class Graph:
    """The kNN graph with reverse edges, for growing regions by local updates."""

    def __init__(self, index: np.ndarray):
        self.index = index
        n, k = index.shape
        order = np.argsort(index.ravel(), kind="stable")
        self.reverse = (order // k).astype(np.int32)  # sources, grouped by target
        self.offsets = np.searchsorted(index.ravel()[order], np.arange(n + 1))
        self.in_degree = np.diff(self.offsets)

    def pointing_at(self, nodes: np.ndarray) -> np.ndarray:
        """The points that have any of ``nodes`` among their neighbours."""
        if not len(nodes):
            return nodes
        starts, ends = self.offsets[nodes], self.offsets[nodes + 1]
        lengths = ends - starts
        idx = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        return np.unique(self.reverse[idx])

    def conductance(self, region: np.ndarray) -> float:
        """Edge ends crossing the border over the smaller side's edge ends (kNN edges, both directions)."""
        k = self.index.shape[1]
        inside = region[self.index]
        cut = (region[:, None] & ~inside).sum() + (~region[:, None] & inside).sum()
        volume = k * region.sum() + self.in_degree[region].sum()
        total = 2 * k * len(region)
        return float(cut / max(1, min(volume, total - volume)))

    def closure(self, region: np.ndarray, vote: float, limit: int) -> np.ndarray:
        """Add points with at least ``vote`` of their neighbours inside until none is left (or > limit)."""
        region = region.copy()
        frontier = np.flatnonzero(region)
        while len(frontier) and region.sum() <= limit:
            candidates = self.pointing_at(frontier)
            candidates = candidates[~region[candidates]]
            joining = candidates[region[self.index[candidates]].mean(1) >= vote]
            region[joining] = True
            frontier = joining
        return region


def grow_region(graph: Graph, members: np.ndarray, score_rank: np.ndarray, votes: Iterable[float],
                min_rank: float) -> tuple[np.ndarray, float, float | None]:
    """The cluster's collapse region (see the module docstring).

    Levels are tried from the strictest vote down; growth stops at the first level whose added points
    score like the corpus (mean score rank below ``min_rank``): an attack's unflagged rest scores below the
    threshold but above clean samples, a neighbouring clean class it would leak into does not.
    """
    n = len(members)
    best, best_phi, best_vote = members, graph.conductance(members), None
    region = members
    for vote in sorted(votes, reverse=True):  # nested: each closure starts from the previous one
        grown = graph.closure(region, vote, limit=n // 2)
        added = grown & ~region
        if grown.sum() > n // 2 or (added.any() and score_rank[added].mean() < min_rank):
            break
        region = grown
        phi = graph.conductance(region)
        if phi < best_phi:
            best, best_phi, best_vote = region, phi, vote
    return best, best_phi, best_vote


@dataclass
class Analysis:
    knn_distance: np.ndarray  # per row (NaN without embedding)
    collapse: np.ndarray  # per row (NaN without embedding)
    cluster: np.ndarray  # per row: id of the flagged cluster it seeds, -1 otherwise
    region: np.ndarray  # per row: id of the collapse region holding it, -1 otherwise
    clusters: list[dict]
    index: dict


def class_centroids(emb: np.ndarray, label_code: np.ndarray, clean: np.ndarray, n_classes: int) -> np.ndarray:
    """Mean embedding of each class's clean rows (NaN rows for classes without any)."""
    centroids = np.full((n_classes, emb.shape[1]), np.nan, np.float32)
    for c in range(n_classes):  # a loop over classes
        rows = clean & (label_code == c)
        if rows.any():
            centroids[c] = emb[rows].mean(0)
    return centroids


def cluster_summaries(data: Scan, per_row: dict[str, np.ndarray], cluster_row: np.ndarray, region_row: np.ndarray,
                      n_clusters: int, label_code: np.ndarray | None, label_names: list[str] | None) -> list[dict]:
    """Size, means, region size and (with labels) nearest clean class of every cluster, vectorised over rows."""
    m = np.flatnonzero(cluster_row >= 0)
    c = cluster_row[m]
    size = np.bincount(c, minlength=n_clusters)

    def mean(values: np.ndarray) -> np.ndarray:
        return np.bincount(c, weights=np.nan_to_num(values[m]), minlength=n_clusters) / np.maximum(size, 1)

    r = region_row[region_row >= 0]
    region_size = np.bincount(r, minlength=n_clusters)
    region_flagged = np.bincount(region_row[(region_row >= 0) & data.suspect], minlength=n_clusters)
    columns = {"size": size, "mean_score": mean(data.score), "mean_collapse": mean(per_row["collapse"]),
               "mean_knn_distance": mean(per_row["knn_distance"]), "region_size": region_size,
               "region_flagged": region_flagged}
    out = [{"id": i, **{name: values[i].item() for name, values in columns.items()}} for i in range(n_clusters)]
    if label_code is None or not label_names:
        return out
    clean = data.has_embedding & ~data.suspect & (region_row == -1)
    centroids = class_centroids(data.embeddings, label_code, clean, len(label_names))
    order = np.argsort(c, kind="stable")
    sums = np.add.reduceat(data.embeddings[m[order]], np.searchsorted(c[order], np.arange(n_clusters)), axis=0)
    distances = np.linalg.norm(sums[:, None, :] / size[:, None, None] - centroids[None], axis=2)
    known = label_code[m] >= 0
    mix = np.bincount(c[known] * len(label_names) + label_code[m][known],
                      minlength=n_clusters * len(label_names)).reshape(n_clusters, -1)
    for i, info in enumerate(out):
        nearest = int(np.nanargmin(distances[i]))
        info.update(nearest_class=label_names[nearest], nearest_class_distance=float(distances[i, nearest]),
                    member_labels={label_names[j]: int(mix[i, j]) for j in np.argsort(-mix[i])[:5] if mix[i, j]})
    return out


def analyse(data: Scan, config: AuditConfig = AuditConfig(), label_code: np.ndarray | None = None,
            label_names: list[str] | None = None) -> Analysis:
    """kNN density, collapse, flagged clusters and their regions over the rows that have embeddings."""
    if data.embeddings is None:
        raise ValueError("these scores hold no embeddings: rerun `dedefilter filter --embeddings`")
    rows = np.flatnonzero(data.has_embedding)
    n = len(data)
    per_row = {name: np.full(n, np.nan, np.float32) for name in ("knn_distance", "collapse")}
    cluster_row, region_row = np.full(n, -1, np.int32), np.full(n, -1, np.int32)
    if len(rows) < 2:
        return Analysis(per_row["knn_distance"], per_row["collapse"], cluster_row, region_row, [],
                        {"kind": "none", "points": len(rows)})
    emb = data.embeddings if len(rows) == n else data.embeddings[rows]
    first, group, counts = unique_rows(emb)
    points = emb if len(first) == len(emb) else emb[first]
    flagged = np.bincount(group, weights=data.suspect[rows], minlength=len(first)) > 0
    nb = neighbours(points, config.k, config)
    distance, collapse = neighbourhood_scores(nb, flagged, counts)
    seeds = flagged & (collapse >= config.min_collapse)
    components = seed_clusters(nb, seeds)
    # rank clusters by rows (then mean score, then smallest component id) -> ids 0, 1, ...
    point_score = np.bincount(group, weights=np.nan_to_num(data.score[rows]), minlength=len(first))
    ids = np.unique(components[seeds])
    sizes = np.bincount(components[seeds], weights=counts[seeds], minlength=components.max() + 1)[ids]
    sums = np.bincount(components[seeds], weights=point_score[seeds], minlength=components.max() + 1)[ids]
    ranked = ids[np.lexsort((ids, -sums / np.maximum(sizes, 1), -sizes))]
    rank_of = np.full(components.max() + 2, -1, np.int32)
    rank_of[ranked] = np.arange(len(ranked))
    cluster = rank_of[components]  # components == -1 maps to the last entry, -1

    finite = np.sort(data.score[np.isfinite(data.score)])
    score_rank = np.searchsorted(finite, point_score / counts, side="right") / max(1, len(finite))
    graph = Graph(nb.index) if len(ranked) else None
    region = np.full(len(first), -1, np.int32)
    details = []
    for c in range(min(len(ranked), config.max_regions)):
        grown, phi, vote = grow_region(graph, cluster == c, score_rank, config.votes, config.min_rank)
        region[grown & (region == -1)] = c  # a point belongs to the largest cluster whose region holds it
        details.append({"conductance": round(phi, 4), "vote": vote})
    cluster_row[rows] = cluster[group]
    region_row[rows] = region[group]
    per_row["knn_distance"][rows] = distance[group]
    per_row["collapse"][rows] = collapse[group]

    clusters = cluster_summaries(data, per_row, cluster_row, region_row, len(ranked), label_code, label_names)
    unique = np.bincount(cluster[cluster >= 0], minlength=len(ranked))
    for c, info in enumerate(clusters):
        info["unique"] = int(unique[c])
        info.update(details[c] if c < config.max_regions else {"conductance": None, "vote": None})
    index = {"kind": nb.kind, "recall_at_k": round(nb.recall, 4), "k": int(nb.index.shape[1]),
             "points": len(first), "rows": len(rows), "duplicate_rows": int(len(rows) - len(first)),
             "seeds": int(seeds.sum()), "flagged_points": int(flagged.sum()), **nb.params}
    return Analysis(per_row["knn_distance"], per_row["collapse"], cluster_row, region_row, clusters, index)


# ---------------------------------------------------------------- labels


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
    from .shards import read_shard

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


# ---------------------------------------------------------------- selection


def select_keys(path: str | Path, threshold: float | None = None, fraction: float | None = None,
                cluster: int | None = None, members: str = "region") -> list[str]:
    """Keys to drop, sorted: scores above ``threshold``, or the top ``fraction``, or one cluster.

    ``path`` is a filter's Parquet directory or an audit directory (needed for ``cluster``);
    ``members`` = ``region`` (the cluster's whole collapse region) or ``flagged`` (its flagged seeds).
    """
    given = [name for name, v in (("threshold", threshold), ("fraction", fraction), ("cluster", cluster))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"select by exactly one of threshold, fraction or cluster (got {given or 'none'})")
    dataset = _dataset(path)
    if cluster is not None:
        column = {"region": "region", "flagged": "cluster"}.get(members)
        if column is None:
            raise ValueError(f"members must be 'region' or 'flagged', not {members!r}")
        if column not in dataset.schema.names:
            raise ValueError(f"{path} holds no clusters: select a cluster from an audit directory")
        table = dataset.to_table(columns=["key"], filter=ds.field(column) == cluster)
        return sorted(table["key"].to_pylist())
    if fraction is not None:
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        scores = dataset.to_table(columns=["score"], filter=pc.is_finite(ds.field("score")))["score"].to_numpy()
        threshold = fraction_threshold(np.sort(scores), fraction)
    keys = []
    for batch in dataset.to_batches(columns=["key"], filter=ds.field("score") > threshold):
        keys.extend(batch.column("key").to_pylist())
    return sorted(keys)


# ---------------------------------------------------------------- the audit


@dataclass
class AuditResult:
    summary: dict
    data: Scan
    analysis: Analysis | None
    label_code: np.ndarray | None
    label_names: list[str] | None


def audit(parquet_dir: str | Path, config: AuditConfig = AuditConfig(),
          labels: dict[str, str] | None = None) -> AuditResult:
    """Statistics, and (when the scores hold embeddings) the collapse analysis."""
    clock = time.perf_counter()
    seconds = {}

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()

    data = scan(parquet_dir, config.batch_rows)
    lap("scan")
    summary = {"parquet": str(parquet_dir), "config": asdict(config), "filter": data.metadata,
               **statistics(data, config), "seconds": seconds}
    lap("statistics")
    label_code = label_names = None
    if labels:
        label_code, label_names = encode_labels(data.keys, labels)
        summary["labelled_rows"] = int((label_code >= 0).sum())
    analysis = None
    if data.embeddings is not None:
        analysis = analyse(data, config, label_code, label_names)
        lap("embedding_analysis")
        summary.update(index=analysis.index, clusters=analysis.clusters,
                       isolated_suspects=int((data.suspect & (analysis.cluster == -1) & data.has_embedding).sum()))
    return AuditResult(summary, data, analysis, label_code, label_names)


def write_audit(result: AuditResult, out_dir: str | Path, row_group: int = 262_144) -> Path:
    """``summary.json`` and ``samples.parquet`` (a row per sample: score, collapse, cluster, region)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
    data, a = result.data, result.analysis
    urls = pa.array(data.urls + [None], pa.string())
    columns = {"key": data.keys, "url": urls.take(pa.array(np.where(data.url_code < 0, len(data.urls), data.url_code))),
               "score": pa.array(data.score, from_pandas=True), "suspect": pa.array(data.suspect),
               "status": pa.array(np.array(STATUSES)[data.status])}
    if a is not None:
        columns.update(knn_distance=pa.array(a.knn_distance, from_pandas=True),
                       collapse=pa.array(a.collapse, from_pandas=True),
                       cluster=pa.array(a.cluster), region=pa.array(a.region))
    pq.write_table(pa.table(columns), out / SAMPLES_FILE, row_group_size=row_group)
    return out
