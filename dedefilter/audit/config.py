"""``AuditConfig``: every setting an audit's statistics and collapse analysis use (stored in summary.json)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AuditConfig:
    k: int = 10  # neighbours per sample
    min_collapse: float = 0.3  # a flagged sample seeds a cluster when this share of its neighbours is flagged
    votes: tuple[float, ...] = (0.5, 0.4, 0.3, 0.2, 0.1)  # closure levels tried when growing a region
    min_rank: float = 0.65  # a level is refused when the points it adds have a lower mean score rank
    max_regions: int = 20  # grow regions for this many of the largest clusters
    # a region is *separated* (collapse.py) when at most this share of its kNN links leave it (attack regions
    # measured 0.0003-0.025, clean ones 0.042-1.0: docs/BENCHMARKS.md, "Separated collapse regions") ...
    separated_conductance: float = 0.05
    # ... and its flagged share is at least this many times the corpus's (attack 3.7-16, the clean 0.042: 1.3)
    separated_enrichment: float = 2.0
    exact_max: int = 20_000  # exact kNN up to here; IVF above: 2x+ faster, recall@10 0.999 (benchmarks/audit_index.py)
    nprobe: int = 8  # IVF lists (of 4 sqrt(n)) searched per query above exact_max (recall measured)
    recall_queries: int = 1000  # IVF recall@k is measured against exact search on this many queries
    fractions: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1)
    threshold_factors: tuple[float, ...] = (0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)
    batch_rows: int = 65_536
    seed: int = 0
