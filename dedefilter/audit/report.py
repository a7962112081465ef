"""The audit as one self-contained HTML page (figures inlined as base64 PNG, also written as files).

matplotlib is imported lazily: install the ``report`` extra (``pip install 'dedefilter[report]'``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import shlex
from pathlib import Path

import numpy as np

from ..data import decode_image
from ..shards import read_shard
from .run import AuditResult
from .stats import drops_above

THUMBNAILS = 16  # per cluster
CLUSTERS_SHOWN = 6

TERMS = {
    "score": "DeDe's reconstruction error: how badly the decoder rebuilds the image from the encoder's "
             "embedding. A triggered image's embedding describes the attacker's target, not the image, so it "
             "scores high.",
    "suspect (flagged)": "a sample whose score is above the stored threshold; the filter dropped it (or, with "
                         "--annotate, passed it on flagged).",
    "collapse": "the share of a sample's k nearest neighbours (by embedding) that are flagged. A backdoored "
                "encoder maps triggered images to one place, so an attack's flagged samples have high collapse; "
                "a false positive among clean images has collapse near 0.",
    "seeds": "flagged samples with collapse at least min_collapse: they start the clusters.",
    "cluster": "a connected group of seeds in the nearest-neighbour graph, numbered by size (0 = largest). A "
               "large, tight cluster is what an attack looks like; scattered flagged samples (isolated "
               "suspects) are what noise looks like.",
    "region": "the cluster grown to the unflagged samples around it (they sit in the same collapse and score "
              "just under the threshold): the attack's images the threshold missed.",
    "conductance": "the share of the region's neighbour links that leave it: near 0 means well separated from "
                   "the rest of the data, near 1 means it blends in.",
    "separated": "a region with conductance at most separated_conductance (0.05): the rest of the corpus hardly "
                 "points into it, as into an attack's collapse. `dedefilter select AUDIT --separated` takes these "
                 "regions whole (with --fraction, before any score).",
    "nearest class": "the class whose clean samples' mean embedding lies closest to the cluster's: the class "
                     "the attack points to (its target).",
}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the audit report needs matplotlib: pip install 'dedefilter[report]'") from err
    return plt


def thumbnails(wanted: dict[str, list[str]], urls: list[str]) -> dict[str, np.ndarray]:
    """Images of the wanted keys (url -> keys), read back from their shards; unreadable ones are skipped."""
    images = {}
    for url in urls:
        keys = set(wanted.get(url, ()))
        if not keys:
            continue
        for sample in read_shard(url):
            if sample.get("__key__") in keys:
                data = next((sample[f] for f in ("png", "jpg", "jpeg", "webp") if f in sample), None)
                try:
                    images[sample["__key__"]] = decode_image(data, 64) if data else None
                except ValueError:
                    continue
    return {k: v for k, v in images.items() if v is not None}


def cluster_examples(result: AuditResult, cluster: int, count: int = THUMBNAILS) -> list[tuple[int, bool]]:
    """Rows to show for a cluster: its highest-scoring flagged members, then unflagged rows of its region."""
    a, data = result.analysis, result.data
    members = np.flatnonzero(a.cluster == cluster)
    members = members[np.argsort(-data.score[members], kind="stable")][: count * 3 // 4]
    extra = np.flatnonzero((a.region == cluster) & ~data.suspect)[: count - len(members)]
    return [(int(r), True) for r in members] + [(int(r), False) for r in extra]


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def figures(result: AuditResult, shard_urls: list[str] | None = None, seed: int = 0) -> dict[str, bytes]:
    """name -> PNG bytes."""
    plt = _pyplot()
    data, s, a = result.data, result.summary, result.analysis
    finite = np.isfinite(data.score)
    scores = data.score[finite]
    threshold = s["threshold"]
    out = {}

    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(scores.min(), np.quantile(scores, 0.999), 80) if len(scores) else 10
    ax.hist(scores, bins=bins, color="#888", label="all scored samples")
    if a is not None and a.clusters:
        ax.hist(data.score[(a.region == 0) & finite], bins=bins, color="#c33", alpha=0.8,
                label="collapse region of cluster 0")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label=f"stored threshold {threshold:.4g}")
    ax.set(yscale="log", xlabel="DeDe score (reconstruction error)", ylabel="samples", title="Score distribution")
    ax.legend(fontsize=8)
    out["scores"] = _png(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ordered = np.sort(scores)
    grid = np.linspace(ordered[0], ordered[-1], 300) if len(ordered) else np.zeros(1)
    ax.plot(grid, drops_above(ordered, grid) / max(1, len(ordered)), color="#246")
    for f in s["sensitivity"]["fractions"]:
        ax.plot(f["threshold"], f["dropped"] / max(1, len(ordered)), "o", color="#246", ms=4)
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label="stored threshold")
        ax.legend(fontsize=8)
    ax.set(yscale="log", xlabel="threshold", ylabel="share dropped (score > threshold)",
           title="Threshold sensitivity (dots: the listed fractions)")
    out["threshold_curve"] = _png(fig)

    shards = sorted(s["shards"], key=lambda r: -r["suspect"] / r["rows"])[:40]
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(shards) + 1))
    ax.barh([Path(r["url"] or "(none)").name for r in shards][::-1],
            [r["suspect"] / r["rows"] for r in shards][::-1], color="#468")
    ax.set(xlabel="suspect share", title=f"Per shard (top {len(shards)} of {len(s['shards'])} by suspect share)")
    ax.tick_params(axis="y", labelsize=7)
    out["shards"] = _png(fig)

    if a is not None:
        rng = np.random.default_rng(seed)
        rows = np.flatnonzero(finite & data.has_embedding)
        rows = np.sort(rng.choice(rows, min(len(rows), 20_000), replace=False))
        fig, ax = plt.subplots(figsize=(7, 4))
        in_region = a.region[rows] >= 0
        ax.scatter(data.score[rows][~in_region], a.collapse[rows][~in_region], s=3, c="#999", label="other")
        ax.scatter(data.score[rows][in_region], a.collapse[rows][in_region], s=5, c=a.region[rows][in_region] % 10,
                   cmap="tab10", vmin=0, vmax=9, label="in a collapse region")
        if threshold is not None:
            ax.axvline(threshold, color="k", ls="--")
        ax.set(xlabel="DeDe score", ylabel="collapse (flagged share of k neighbours)",
               title=f"Score vs collapse ({len(rows)} samples shown)")
        ax.legend(fontsize=8)
        out["collapse"] = _png(fig)

        if a.clusters and shard_urls:
            shown = a.clusters[:CLUSTERS_SHOWN]
            examples = {c["id"]: cluster_examples(result, c["id"]) for c in shown}
            urls = np.array(data.urls + [""])
            wanted: dict[str, list[str]] = {}
            for rows_c in examples.values():
                for r, _ in rows_c:
                    wanted.setdefault(urls[data.url_code[r]], []).append(data.keys[r].as_py())
            images = thumbnails(wanted, shard_urls)
            fig, axes = plt.subplots(len(shown), THUMBNAILS, figsize=(THUMBNAILS * 0.7, len(shown) * 0.95),
                                     squeeze=False)
            for row_axes, c in zip(axes, shown, strict=True):
                for ax in row_axes:
                    ax.axis("off")
                for ax, (r, flagged) in zip(row_axes, examples[c["id"]], strict=False):
                    image = images.get(data.keys[r].as_py())
                    if image is not None:
                        ax.imshow(image)
                        ax.set_title(f"{data.score[r]:.3f}", fontsize=6, color="#c00" if flagged else "#060")
                label = f"#{c['id']} n={c['size']}" + (f"\n→{c['nearest_class']}" if "nearest_class" in c else "")
                row_axes[0].text(-0.1, 0.5, label, transform=row_axes[0].transAxes, ha="right", va="center",
                                 fontsize=7)
            fig.suptitle("Clusters: flagged members (red score), then unflagged samples of the region (green)",
                         fontsize=9)
            out["thumbnails"] = _png(fig)
    return out


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)

    def cell(v) -> str:
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, dict):
            v = ", ".join(f"{k}: {n}" for k, n in v.items())
        return f"<td>{html.escape(str(v))}</td>"

    body = "".join("<tr>" + "".join(cell(r.get(c, "")) for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def cluster_keys(summary: dict, shown: int = CLUSTERS_SHOWN) -> str:
    """Each shown cluster's example keys with its counts, and the command that selects it."""
    source = html.escape(shlex.quote(summary.get("out", "AUDIT")))
    items = []
    for c in summary["clusters"][:shown]:
        keys = ", ".join(html.escape(json.dumps(k)) for k in c.get("example_keys", []))
        items.append(f"<li>cluster {c['id']}: {c['size']} flagged, {c['region_size']} in its region "
                     f"(highest-scoring keys: {keys})<br><code>dedefilter select {source} --cluster {c['id']} "
                     f"--out cluster{c['id']}.jsonl</code> (add <code>--members flagged</code> for the flagged "
                     f"members only), then <code>dedefilter reshard SHARDS --drop-keys cluster{c['id']}.jsonl "
                     f"--out CLEAN</code></li>")
    more = len(summary["clusters"]) - shown
    tail = f"<p>{more} more clusters in summary.json.</p>" if more > 0 else ""
    return "<h3>Keys and next step</h3><ul>" + "".join(items) + "</ul>" + tail


def write_report(result: AuditResult, out_dir: str | Path, shard_urls: list[str] | None = None) -> Path:
    """Write ``report.html`` and ``figures/*.png`` into ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    pngs = figures(result, shard_urls)
    for name, png in pngs.items():
        (out / "figures" / f"{name}.png").write_bytes(png)
    s = result.summary

    def img(name: str) -> str:
        if name not in pngs:
            return ""
        return f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(pngs[name]).decode()}">'

    s = {**s, "out": str(out)}
    counts = {k: s[k] for k in ("rows", "kept", "dropped", "error", "suspect", "scored", "threshold")}
    parts = [f"<h1>dedefilter audit</h1><p>{html.escape(s['parquet'])}</p>", "<h2>Summary</h2>",
             _table([counts], list(counts))]
    if "class_names" in s:
        parts.append(f"<p>Class names: {html.escape(s['class_names'])}</p>")
    if "index" in s:
        parts += [_table([{**s["index"], "isolated_suspects": s["isolated_suspects"],
                           "separated_rows": s.get("separated_rows"), "clusters": len(s["clusters"])}],
                         list(s["index"]) + ["isolated_suspects", "separated_rows", "clusters"])]
    parts += ["<h2>Scores</h2>", img("scores"), img("threshold_curve"),
              _table(s["sensitivity"]["fractions"], ["fraction", "threshold", "dropped"])]
    if "thresholds" in s["sensitivity"]:
        parts.append(_table(s["sensitivity"]["thresholds"], ["factor", "threshold", "dropped"]))
    if "clusters" in s:
        columns = ["id", "size", "mean_score", "mean_collapse", "region_size", "region_flagged", "conductance",
                   "separated", "nearest_class", "member_labels"]
        parts += ["<h2>Flagged clusters</h2>",
                  ("<p>Clusters of flagged samples whose neighbourhoods are mostly flagged (collapse), largest "
                   "first; the region adds unflagged samples inside the same collapse. Low conductance = well "
                   "separated from the rest of the corpus. Terms are explained <a href='#terms'>below</a>.</p>"),
                  _table(s["clusters"][:20], columns), cluster_keys(s), img("thumbnails"), img("collapse")]
    else:
        parts += ["<h2>Flagged clusters</h2>", f"<p><b>Clustering {html.escape(s.get('clustering', ''))}</b></p>"]
    parts += ["<h2>Shards</h2>", img("shards"), "<h2 id='terms'>Terms</h2>",
              "<dl>" + "".join(f"<dt><b>{html.escape(t)}</b></dt><dd>{html.escape(d)}</dd>" for t, d in TERMS.items())
              + "</dl>",
              "<details><summary>summary.json</summary><pre>"
              + html.escape(json.dumps({k: v for k, v in s.items() if k != "shards"}, indent=1)) + "</pre></details>"]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}img{max-width:100%;display:block}")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>dedefilter audit</title><style>{style}</style>" \
           f"</head><body>{''.join(parts)}</body></html>"
    path = out / "report.html"
    path.write_text(page)
    return path
