"""Counts, score distributions overall and per shard, and how many a different cut would drop."""

from __future__ import annotations

import numpy as np

from ..calibration import upper_quantile
from .config import AuditConfig
from .scores import STATUSES, Scan


def drops_above(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many finite scores lie strictly above each threshold (the filter's ``score > t`` rule)."""
    return len(sorted_scores) - np.searchsorted(sorted_scores, thresholds, side="right")


def distribution(values: np.ndarray, quantiles: tuple[float, ...] = (0.01, 0.5, 0.9, 0.99)) -> dict:
    """Mean, max and a few quantiles of finite scores ({} when there are none)."""
    if not len(values):
        return {}
    q = np.quantile(values, quantiles)
    return {"mean": float(values.mean()), "max": float(values.max()),
            **{f"p{round(p * 100)}": float(v) for p, v in zip(quantiles, q, strict=True)}}


def per_shard(data: Scan) -> list[dict]:
    """Counts and score distribution of each shard (rows grouped by url code, not by a loop over rows)."""
    shards = []
    order = np.argsort(data.url_code, kind="stable")
    bounds = np.searchsorted(data.url_code[order], np.arange(-1, len(data.urls) + 1))
    for code in range(-1, len(data.urls)):  # a loop over shards
        rows = order[bounds[code + 1]:bounds[code + 2]]
        if not len(rows):
            continue
        c = np.bincount(data.status[rows], minlength=3)
        s = data.score[rows]
        shards.append({"url": data.urls[code] if code >= 0 else None, "rows": len(rows),
                       **dict(zip(STATUSES, c.tolist(), strict=True)),
                       "suspect": int(data.suspect[rows].sum()), "score": distribution(s[np.isfinite(s)])})
    return shards


def statistics(data: Scan, config: AuditConfig = AuditConfig()) -> dict:
    """Counts, score distribution overall and per shard, and threshold sensitivity.

    The fraction rows cut where ``calibrate --contamination`` (``calibration.upper_quantile``) cuts.
    """
    finite = np.isfinite(data.score)
    ordered = np.sort(data.score[finite])
    counts = np.bincount(data.status, minlength=3)
    stored = data.thresholds[0] if len(data.thresholds) == 1 else None
    fractions = []
    for f in config.fractions if len(ordered) else ():
        cut = upper_quantile(ordered, f)
        fractions.append({"fraction": f, "threshold": cut, "dropped": int(drops_above(ordered, np.array([cut]))[0])})
    sensitivity = {"fractions": fractions}
    if stored is not None:
        ts = np.array([stored * f for f in config.threshold_factors])
        sensitivity["thresholds"] = [{"factor": f, "threshold": float(t), "dropped": int(d)} for f, t, d in
                                     zip(config.threshold_factors, ts, drops_above(ordered, ts), strict=True)]
    return {"rows": len(data), **dict(zip(STATUSES, counts.tolist(), strict=True)),
            "suspect": int(data.suspect.sum()), "scored": int(finite.sum()),
            "threshold": stored, "thresholds_seen": data.thresholds, "score": distribution(ordered),
            "shards": per_shard(data), "sensitivity": sensitivity}
