"""Audit at scale: >= 1,000,000 Parquet rows with 128-d embeddings, time and peak RSS.

Rows are synthesised from the demo's real embeddings (the scores Parquet that benchmarks/audit_demo.py
writes): projected onto their top 128 principal components, then new rows are drawn SMOTE-style, each
on the segment between a real sample and one of its 10 nearest real neighbours, with the score
interpolated the same way and the ground truth (triggered or not) of the real sample; keys are new.
The audit (with its HTML report) then runs as a separate process, and its wall and CPU time and peak
RSS (ru_maxrss of the child) are recorded.

    PYTHONPATH=$PWD nice -n 5 python benchmarks/audit_scale.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

sys.path.insert(0, str(Path(__file__).parent))
from audit_demo import truth

from dedefilter.sink import ParquetSink


def real_rows(scores_dir: str, shards: list[str], dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The demo's embeddings projected to ``dim`` (PCA), with scores, ground truth and the threshold."""
    table = ds.dataset(scores_dir, format="parquet").to_table(columns=["key", "score", "threshold", "embedding"],
                                                              filter=ds.field("status") != "error")
    x = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    x -= x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    triggered = truth(shards)
    return (np.ascontiguousarray(x @ vt[:dim].T), table["score"].to_numpy(),
            np.array([triggered[k] for k in table["key"].to_pylist()]), table["threshold"][0].as_py())


def synthesise(out: Path, rows: int, x: np.ndarray, scores: np.ndarray, threshold: float, seed: int = 0,
               parts: int = 4, chunk: int = 100_000) -> np.ndarray:
    """Write ``rows`` synthetic rows to ``out`` in ``parts`` part files; returns each row's source index."""
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    _, nbrs = index.search(x, 11)
    rng = np.random.default_rng(seed)
    sources = rng.integers(0, len(x), rows)
    per_part = -(-rows // parts)
    for p in range(parts):
        with ParquetSink(out, f"part-r00000-w{p:03d}", "synthetic", threshold, embed_dim=x.shape[1]) as sink:
            for start in range(p * per_part, min(rows, (p + 1) * per_part), chunk):
                i = sources[start:min(rows, (p + 1) * per_part, start + chunk)]
                j = nbrs[i, rng.integers(1, 11, len(i))]
                t = rng.uniform(0, 1, len(i)).astype(np.float32)
                emb = x[i] + t[:, None] * (x[j] - x[i])
                s = scores[i] + t * (scores[j] - scores[i])
                suspect = s > threshold
                ids = np.arange(start, start + len(i))
                sink.write([f"syn-{r:07d}" for r in ids], [f"syn-{r // 10_000:05d}.tar" for r in ids], s, suspect,
                           np.where(suspect, "dropped", "kept"), [None] * len(i), emb)
    return sources


def timed(command: list[str]) -> dict:
    """Run ``command`` as a child process: wall and CPU seconds, peak RSS (the child's ru_maxrss).

    CPU seconds (user + system) stay meaningful on a machine shared with other jobs; wall does not.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "peak_rss_gb": round(after.ru_maxrss / 2**20, 3), "load_average_after": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--scores", default="/tmp/dedefilter-audit-demo/scores/parquet",
                        help="the demo's scores with embeddings (benchmarks/audit_demo.py writes them)")
    parser.add_argument("--demo", default=".dedefilter-demo")
    parser.add_argument("--work", default="/tmp/dedefilter-audit-scale")
    parser.add_argument("--results", default="benchmarks/results/audit_scale.json")
    args = parser.parse_args()
    work = Path(args.work)
    shards = sorted(str(p) for p in (Path(args.demo) / "test-shards").glob("*.tar"))
    x, scores, triggered, threshold = real_rows(args.scores, shards, args.dim)
    parquet = work / f"parquet-{args.rows}"
    start = time.perf_counter()
    if parquet.exists():
        for p in parquet.glob("*.parquet"):
            p.unlink()
    sources = synthesise(parquet, args.rows, x, scores, threshold)
    synth_seconds = time.perf_counter() - start
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    os.environ.update(env)
    run = timed([sys.executable, "-m", "dedefilter.cli", "audit", str(parquet), "--out", str(work / "audit")])
    summary = json.loads((work / "audit" / "summary.json").read_text())
    samples = ds.dataset(str(work / "audit" / "samples.parquet")).to_table(columns=["key", "cluster", "region"])
    row_of = np.array([int(k[4:]) for k in samples["key"].to_pylist()])
    is_triggered = triggered[sources[row_of]]
    cluster0 = samples["cluster"].to_numpy() == 0
    region0 = samples["region"].to_numpy() == 0
    result = {
        "rows": args.rows, "dim": args.dim, "synthesis_seconds": round(synth_seconds, 1),
        "parquet_bytes": sum(p.stat().st_size for p in parquet.glob("*.parquet")),
        "audit_with_report": run, "phase_seconds": summary["seconds"], "index": summary["index"],
        "suspect": summary["suspect"],
        "clusters": len(summary["clusters"]), "largest_cluster_size": summary["clusters"][0]["size"],
        "largest_cluster_triggered_share": round(float(is_triggered[cluster0].mean()), 4),
        "region0_triggered_recall": round(float(region0[is_triggered].mean()), 4),
        "region0_clean_share_removed": round(float(region0[~is_triggered].mean()), 4),
        "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
