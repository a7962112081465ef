"""Exact (flat) vs IVF kNN for the audit: where IVF starts to pay, its recall, and whether it changes results.

1. Side by side in one process, for growing N (rows synthesised from the demo's real embeddings as in
   benchmarks/audit_scale.py, 128-d): seconds for every row's k=10 neighbours with the flat index and
   with IVF (train + add + search), and IVF's recall@10 against exact search.
2. IVF recall and time for several nprobe at the largest N.
3. On the demo's real 256-d embeddings: the full collapse analysis with flat and with IVF forced
   (exact_max=0); the largest cluster and its region compared as key sets.

    PYTHONPATH=$PWD nice -n 5 python benchmarks/audit_index.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from audit_scale import real_rows

from dedefilter.audit import AuditConfig, analyse, neighbours, scan


def smote(x: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
    import faiss

    _, nbrs = faiss.knn(x, x, 11)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(x), rows)
    j = nbrs[i, rng.integers(1, 11, rows)]
    t = rng.uniform(0, 1, rows).astype(np.float32)[:, None]
    return np.ascontiguousarray(x[i] + t * (x[j] - x[i]))


def timed_knn(x: np.ndarray, config: AuditConfig) -> tuple[float, float]:
    start = time.perf_counter()
    nb = neighbours(x, 10, config)
    return time.perf_counter() - start, nb.recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", default="/tmp/dedefilter-audit-demo/scores/parquet")
    parser.add_argument("--demo", default=".dedefilter-demo")
    parser.add_argument("--sizes", default="10000,25000,50000")
    parser.add_argument("--ivf-only", default="100000", help="sizes timed with IVF only (flat too slow)")
    parser.add_argument("--results", default="benchmarks/results/audit_index.json")
    args = parser.parse_args()
    shards = sorted(str(p) for p in (Path(args.demo) / "test-shards").glob("*.tar"))
    x, _, _, _ = real_rows(args.scores, shards, 128)
    flat, ivf = replace(AuditConfig(), exact_max=10**12), replace(AuditConfig(), exact_max=0)
    sizes = []
    for n in [int(s) for s in args.sizes.split(",")] + [int(s) for s in args.ivf_only.split(",") if s]:
        data = smote(x, n)
        ivf_seconds, recall = timed_knn(data, ivf)
        row = {"rows": n, "ivf_seconds": round(ivf_seconds, 1), "ivf_recall_at_10": round(recall, 4)}
        if str(n) in args.sizes.split(","):
            row["flat_seconds"] = round(timed_knn(data, flat)[0], 1)
        sizes.append(row)
        print(json.dumps(row), flush=True)
    largest = smote(x, sizes[-1]["rows"])
    probes = []
    for nprobe in (4, 8, 16, 32):
        seconds, recall = timed_knn(largest, replace(ivf, nprobe=nprobe))
        probes.append({"rows": len(largest), "nprobe": nprobe, "seconds": round(seconds, 1),
                       "recall_at_10": round(recall, 4)})
        print(json.dumps(probes[-1]), flush=True)

    data = scan(args.scores)
    keys = np.array(data.keys.to_pylist())
    exact, approx = analyse(data, flat), analyse(data, ivf)
    agreement = {}
    for name in ("cluster", "region"):
        a, b = set(keys[getattr(exact, name) == 0]), set(keys[getattr(approx, name) == 0])
        agreement[f"{name}0_jaccard"] = round(len(a & b) / len(a | b), 4)
        agreement[f"{name}0_sizes"] = [len(a), len(b)]
    agreement["ivf_recall_at_10"] = approx.index["recall_at_k"]
    agreement["clusters"] = [len(exact.clusters), len(approx.clusters)]
    print(json.dumps(agreement))
    result = {"sizes": sizes, "nprobe": probes, "demo_flat_vs_ivf": agreement, "cpu_count": os.cpu_count(),
              "load_average_at_end": os.getloadavg()}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
