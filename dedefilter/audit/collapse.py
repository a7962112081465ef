"""Embedding collapse: kNN density, flagged clusters and their collapse regions.

Why clusters: a backdoored encoder maps every triggered image to one target embedding, so flagged
samples of an attack *collapse* together, while false positives are scattered. Per unique embedding:

* ``knn_distance`` — mean L2 distance to its k nearest rows (exact duplicates count as distance 0);
* ``collapse`` — the share of those k rows that are flagged (suspect). An isolated high score has
  collapse near 0; a flagged sample inside an attack's collapse has collapse near 1.

Flagged samples with ``collapse >= min_collapse`` seed clusters: connected components of the mutual kNN
graph among seeds, ranked by size (id 0 = largest). DeDe flags only part of an attack (the demo's
1%-FPR threshold catches ~65% of triggered images), but the unflagged triggered images sit in the same
region. So each cluster grows into its *collapse region*: the closure under "join when at least a
share ``v`` of your k neighbours are in the region", for ``v`` in ``votes`` (a nested family), keeping
the member of the family with the lowest conductance in the kNN graph (the share of the region's edge
ends that cross its border) among those no bigger than the rest of the corpus. This is a sweep cut,
as in local graph clustering: the region stops where it is best separated from everything else.
A region is *separated* when the rest of the corpus hardly points into it (conductance at most
``separated_conductance``) and it holds flagged samples at ``separated_enrichment`` times the corpus's
rate or more. A poisoned group with one target is such a group (CLIPs trained on 1%-poisoned pairs:
every poisoned pair's neighbours were poisoned pairs; regions 0.0003-0.003, 3.7-4.8x the flag rate;
the demo's BadEncoder collapse 0.025, 16x); flagged clean samples sit inside classes that touch others
(0.07-1.0), or in a sub-class apart from the rest but flagged at about the corpus's rate (0.042, 1.3x).
``select --separated`` takes these regions whole, before any score: the poisoned pairs that DeDe ranks
low are in them too. A whole class the detector flags, apart from every other class, would look the same.
The sweep also stops at the first level whose added samples score like the corpus (mean score rank
below ``min_rank``): an attack's unflagged rest scores under the threshold but above clean samples
(on the demo the accepted levels added samples of mean rank 0.91, 0.84, 0.77; the refused next level,
a leak into clean classes, 0.45), while a clean class next to the collapse scores like any other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .config import AuditConfig
from .scores import Scan


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
    """Connected components of the mutual kNN graph among seed points; -1 for non-seeds, ids unranked.

    Mutual links only (each point among the other's k nearest): one-way links from the edge of a crowd
    of flagged clean images into an attack's group would merge the two into one cluster (a CLIP loop's
    poisoned pairs joined 1,462 flagged clean pairs that way, and their region blended in).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n, k = nb.index.shape
    rows = np.repeat(np.arange(n), k)
    cols = nb.index.ravel()
    keep = seeds[rows] & seeds[cols]
    graph = coo_matrix((np.ones(keep.sum(), np.int8), (rows[keep], cols[keep])), shape=(n, n)).tocsr()
    _, labels = connected_components(graph.multiply(graph.T), directed=False)
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
    separated: np.ndarray  # per row: its region is separated from the rest (conductance <= the config's)
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
        return Analysis(per_row["knn_distance"], per_row["collapse"], cluster_row, region_row,
                        np.zeros(n, bool), [], {"kind": "none", "points": len(rows)})
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
    flag_rate = (counts * flagged).sum() / counts.sum()
    for c in range(min(len(ranked), config.max_regions)):
        grown, phi, vote = grow_region(graph, cluster == c, score_rank, config.votes, config.min_rank)
        region[grown & (region == -1)] = c  # a point belongs to the largest cluster whose region holds it
        enrichment = (counts[grown] * flagged[grown]).sum() / counts[grown].sum() / flag_rate
        details.append({"conductance": round(phi, 4), "vote": vote, "flag_enrichment": round(float(enrichment), 2),
                        "separated": bool(phi <= config.separated_conductance
                                          and enrichment >= config.separated_enrichment)})
    cluster_row[rows] = cluster[group]
    region_row[rows] = region[group]
    per_row["knn_distance"][rows] = distance[group]
    per_row["collapse"][rows] = collapse[group]

    clusters = cluster_summaries(data, per_row, cluster_row, region_row, len(ranked), label_code, label_names)
    unique = np.bincount(cluster[cluster >= 0], minlength=len(ranked))
    for c, info in enumerate(clusters):
        info["unique"] = int(unique[c])
        info.update(details[c] if c < config.max_regions else {"conductance": None, "vote": None,
                                                               "flag_enrichment": None, "separated": False})
    separated_ids = np.flatnonzero([info["separated"] for info in clusters])
    separated = np.isin(region_row, separated_ids)
    index = {"kind": nb.kind, "recall_at_k": round(nb.recall, 4), "k": int(nb.index.shape[1]),
             "points": len(first), "rows": len(rows), "duplicate_rows": int(len(rows) - len(first)),
             "seeds": int(seeds.sum()), "flagged_points": int(flagged.sum()), **nb.params}
    return Analysis(per_row["knn_distance"], per_row["collapse"], cluster_row, region_row, separated, clusters, index)
