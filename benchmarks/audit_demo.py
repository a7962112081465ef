"""The audit's must-show on the demo's output, end to end through the CLI.

filter (with embeddings) -> audit -> select the largest flagged cluster's region -> reshard, then
compare with the ground truth: a sample is triggered when its shard image differs from the original
Fashion-MNIST test image of the same index (keys are ``fmnist-test-NNNNN``), so no RNG is replayed.

    PYTHONPATH=$PWD python benchmarks/audit_demo.py          # after `make demo` (or `dedefilter demo`)

Prints the largest cluster's triggered share and nearest class, and after selecting it and
resharding, the shares of triggered and clean samples removed; writes benchmarks/results/audit_demo.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dedefilter.audit import read_selection
from dedefilter.cli import main
from dedefilter.data import decode_image, fashion_mnist
from dedefilter.shards import read_shard


def truth(urls: list[str]) -> dict[str, bool]:
    """key -> triggered, by comparing each shard image with the untouched original."""
    originals, _ = fashion_mnist("test")
    out = {}
    for url in urls:
        for sample in read_shard(url):
            index = int(sample["__key__"].rsplit("-", 1)[1])
            out[sample["__key__"]] = bool((decode_image(sample["png"], 32) != originals[index]).any())
    return out


def run(argv: list[str]) -> None:
    if main(argv) != 0:
        raise SystemExit(f"dedefilter {argv[0]} failed")


def evaluate(args: argparse.Namespace) -> dict:
    demo, work = Path(args.demo), Path(args.work)
    urls = sorted(str(p) for p in (demo / "test-shards").glob("*.tar"))
    start = time.perf_counter()
    if not args.reuse_scores or not (work / "scores" / "parquet").exists():
        run(["filter", *urls, "--encoder", "fmnist-badencoder",
             "--detector", str(demo / "detector-fmnist-badencoder.pt"), "--out", str(work / "scores"),
             "--embeddings", "--no-shards", "--overwrite"])
    scored = time.perf_counter()
    run(["audit", str(work / "scores" / "parquet"), "--out", str(work / "audit"), "--shards", *urls,
         "--label-field", "json:label"])
    audited = time.perf_counter()
    run(["select", str(work / "audit"), "--cluster", "0", "--out", str(work / "cluster0.jsonl")])
    out_shards = work / "resharded"
    run(["reshard", *urls, "--drop-keys", str(work / "cluster0.jsonl"), "--out", str(out_shards), "--overwrite"])
    done = time.perf_counter()

    triggered = truth(urls)
    kept = {s["__key__"] for p in sorted(out_shards.glob("*.tar")) for s in read_shard(str(p))}
    removed = set(triggered) - kept
    summary = json.loads((work / "audit" / "summary.json").read_text())
    largest = summary["clusters"][0]
    import pyarrow.dataset as ds

    samples = ds.dataset(str(work / "audit" / "samples.parquet")).to_table(columns=["key", "cluster", "suspect"])
    members = [k for k, c in zip(samples["key"].to_pylist(), samples["cluster"].to_pylist(), strict=True) if c == 0]
    flagged = [k for k, f in zip(samples["key"].to_pylist(), samples["suspect"].to_pylist(), strict=True) if f]
    n_trig = sum(triggered.values())
    n_clean = len(triggered) - n_trig
    result = {
        "rows": summary["rows"], "triggered": n_trig, "clean": n_clean,
        "threshold_alone": {"flagged": len(flagged),
                            "triggered_flagged": round(sum(triggered[k] for k in flagged) / n_trig, 4),
                            "clean_flagged": round(sum(not triggered[k] for k in flagged) / n_clean, 4)},
        "clusters": len(summary["clusters"]), "largest_cluster_size": largest["size"],
        "largest_cluster_triggered_share": round(sum(triggered[k] for k in members) / len(members), 4),
        "largest_cluster_nearest_class": largest["nearest_class"],
        "largest_cluster_member_labels": largest["member_labels"],
        "region_size": largest["region_size"], "region_conductance": largest["conductance"],
        "region_vote": largest["vote"],
        "selected_keys": len(read_selection(work / "cluster0.jsonl").keys),
        "triggered_removed": round(sum(triggered[k] for k in removed) / n_trig, 4),
        "clean_removed": round(sum(not triggered[k] for k in removed) / n_clean, 4),
        "index": summary["index"],
        "seconds": {"filter": round(scored - start, 1), "audit_with_report": round(audited - scored, 1),
                    "select_and_reshard": round(done - audited, 1)},
    }
    result["pass"] = bool(result["largest_cluster_triggered_share"] >= 0.9
                          and result["largest_cluster_nearest_class"] == "Trouser"
                          and result["triggered_removed"] >= 0.95 and result["clean_removed"] <= 0.02)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=".dedefilter-demo", help="the demo's work folder (read only)")
    parser.add_argument("--work", default="/tmp/dedefilter-audit-demo", help="where scores, audit and shards go")
    parser.add_argument("--reuse-scores", action="store_true", help="skip the filter when its Parquet exists")
    parser.add_argument("--results", default="benchmarks/results/audit_demo.json")
    args = parser.parse_args()
    result = evaluate(args)
    print(json.dumps(result, indent=2))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
