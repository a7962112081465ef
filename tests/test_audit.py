"""The offline audit on small hand-made Parquet files: counts, sensitivity, a planted collapse, selections."""

from __future__ import annotations

import html
import json
from dataclasses import replace

import numpy as np
import pytest

from dedefilter.audit import (
    AuditConfig,
    Scan,
    analyse,
    audit,
    class_names,
    guess_class_names,
    labels_from_shards,
    name_classes,
    read_selection,
    select_keys,
    write_audit,
)
from dedefilter.cli import main
from dedefilter.shards import read_shard
from dedefilter.sink import ParquetSink


def write_scores(directory, name, keys, url, scores, threshold, embeddings=None, errors=0):
    """One part file as the filter writes it: scored rows, then ``errors`` error rows."""
    scores = np.asarray(scores, np.float32)
    suspect = scores > threshold
    with ParquetSink(directory, name, "model-x", threshold, embed_dim=None if embeddings is None else
                     embeddings.shape[1]) as sink:
        sink.write(list(keys) + [f"{name}-err-{i}" for i in range(errors)], [url] * (len(keys) + errors),
                   np.concatenate([scores, np.full(errors, np.nan, np.float32)]),
                   np.concatenate([suspect, np.zeros(errors, bool)]),
                   ["dropped" if s else "kept" for s in suspect] + ["error"] * errors,
                   [None] * len(keys) + ["unreadable"] * errors, embeddings)


def test_counts_per_shard_and_threshold_sensitivity(tmp_path):
    write_scores(tmp_path, "part-a", [f"a{i}" for i in range(6)], "a.tar", [.1, .2, .3, .4, .6, .9], 0.5, errors=1)
    write_scores(tmp_path, "part-b", [f"b{i}" for i in range(4)], "b.tar", [.05, .55, .7, .8], 0.5)
    summary = audit(tmp_path, replace(AuditConfig(), fractions=(0.2, 0.5), threshold_factors=(0.5, 1.0, 1.5))).summary
    assert {k: summary[k] for k in ("rows", "kept", "dropped", "error", "suspect", "scored")} == \
        {"rows": 11, "kept": 5, "dropped": 5, "error": 1, "suspect": 5, "scored": 10}
    shards = {s["url"]: (s["rows"], s["kept"], s["dropped"], s["error"]) for s in summary["shards"]}
    assert shards == {"a.tar": (7, 4, 2, 1), "b.tar": (4, 1, 3, 0)}
    assert summary["shards"][1]["score"]["max"] == pytest.approx(0.8)
    thresholds = [(t["factor"], t["dropped"]) for t in summary["sensitivity"]["thresholds"]]
    assert thresholds == [(0.5, 7), (1.0, 5), (1.5, 2)]  # > .25, > .5, > .75
    fractions = [(f["fraction"], round(f["threshold"], 2), f["dropped"]) for f in summary["sensitivity"]["fractions"]]
    assert fractions == [(0.2, 0.8, 1), (0.5, 0.55, 4)]  # at most the fraction, as `calibrate --contamination`
    assert "clusters" not in summary  # no embeddings stored, no embedding analysis


@pytest.fixture
def planted(tmp_path):
    """Four labelled classes in 16-d; a tight planted collapse near class B (24 of its 40 flagged, the rest
    scoring just under the threshold, above every clean sample), 10 scattered
    false positives, and one flagged image copied 6 times far away."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (4, 16))
    names = np.array(list("ABCD"))
    clean = np.concatenate([rng.normal(c, 1, (100, 16)) for c in centres])
    clean_labels = np.repeat(names, 100)
    direction = rng.normal(size=16)
    planted_x = centres[1] + 6 * direction / np.linalg.norm(direction) + rng.normal(0, 0.1, (40, 16))
    duplicate = np.full((6, 16), 60.0)
    x = np.concatenate([clean, planted_x, duplicate]).astype(np.float32)
    keys = [f"clean-{i:03d}" for i in range(400)] + [f"planted-{i:02d}" for i in range(40)] + \
        [f"dup-{i}" for i in range(6)]
    scores = np.concatenate([rng.uniform(0.1, 0.4, 400), np.r_[np.full(24, 0.9), np.full(16, 0.45)], np.full(6, 0.7)])
    false_positives = rng.choice(400, 10, replace=False)
    scores[false_positives] = 0.8
    order = rng.permutation(len(keys))  # rows in no particular order, split over two parts
    keys, x, scores = [keys[i] for i in order], x[order], scores[order]
    write_scores(tmp_path / "scores", "part-0", keys[:200], "s0.tar", scores[:200], 0.5, x[:200])
    write_scores(tmp_path / "scores", "part-1", keys[200:], "s1.tar", scores[200:], 0.5, x[200:], errors=2)
    labels = {k: str(clean_labels[int(k[6:])]) if k.startswith("clean") else "A" for k in keys}  # sources: A
    return tmp_path / "scores", labels, {f"clean-{i:03d}" for i in false_positives}


def test_planted_collapse_is_found_ranked_first_and_grown_to_its_unflagged_rest(planted, tmp_path):
    scores, labels, false_positives = planted
    result = audit(scores, AuditConfig(), labels)
    clusters, a, keys = result.summary["clusters"], result.analysis, np.array(result.data.keys.to_pylist())
    # seeds join along mutual links: 21 of the 24 flagged are cluster 0, the other 3 clusters of their own
    assert clusters[0]["size"] == 21 and clusters[0]["nearest_class"] == "B"
    assert set(keys[a.cluster == 0]) < {f"planted-{i:02d}" for i in range(24)}
    assert set(keys[a.region == 0]) == {f"planted-{i:02d}" for i in range(40)}  # the 16 unflagged joined
    assert clusters[0]["conductance"] < 0.05 and clusters[0]["separated"] and not clusters[1]["separated"]
    separated = set(keys[a.separated])
    assert separated > {f"planted-{i:02d}" for i in range(40)} and len(separated) == 41  # and one clean neighbour
    assert result.summary["separated_rows"] == 41
    # the 6 copies: one point, one cluster of 6 rows, 5 of its 10 nearest rows are its flagged copies
    assert (clusters[1]["size"], clusters[1]["unique"]) == (6, 1)
    assert result.summary["index"]["duplicate_rows"] == 5
    assert a.collapse[np.char.startswith(keys, "dup")].tolist() == [0.5] * 6
    # scattered false positives seed nothing
    assert set(keys[(a.cluster == -1) & result.data.suspect]) == false_positives
    assert result.summary["isolated_suspects"] == 10
    assert np.isnan(a.collapse[np.char.find(keys, "err") >= 0]).all()


def test_scores_held_in_memory_give_the_same_regions_as_their_parquet(planted):
    scores, labels, _ = planted
    written = audit(scores, AuditConfig(), labels)
    data = written.data
    scored = data.status != 2  # the arrays hold what was scored: no error rows
    in_memory = analyse(Scan.from_arrays(np.array(data.keys.to_pylist())[scored].tolist(), data.score[scored], 0.5,
                                         data.embeddings[scored]))
    assert (in_memory.region == written.analysis.region[scored]).all()
    assert (in_memory.cluster == written.analysis.cluster[scored]).all()


def test_ivf_index_finds_the_same_collapse(planted):
    scores, labels, _ = planted
    exact = audit(scores, AuditConfig(), labels)
    ivf = audit(scores, replace(AuditConfig(), exact_max=0, nprobe=2), labels)
    index = ivf.summary["index"]
    assert (index["kind"], index["nlist"], index["nprobe"]) == ("ivf", 11, 2)  # 2 of 11 lists searched
    assert index["recall_at_k"] >= 0.95
    assert (ivf.analysis.region == exact.analysis.region).all()
    assert (ivf.analysis.cluster == exact.analysis.cluster).all()


def test_selection_by_threshold_fraction_or_cluster(planted, tmp_path):
    scores, labels, false_positives = planted
    write_audit(audit(scores, AuditConfig(), labels), tmp_path / "audit")
    flagged = sorted({f"planted-{i:02d}" for i in range(24)} | false_positives | {f"dup-{i}" for i in range(6)})
    assert select_keys(scores, threshold=0.5) == flagged
    assert select_keys(tmp_path / "audit", threshold=0.75) == sorted(set(flagged) - {f"dup-{i}" for i in range(6)})
    # at most this share, cut as `calibrate --contamination` cuts: the 10 at 0.8 sit at the cut and stay
    assert select_keys(scores, fraction=30 / 446) == sorted(f"planted-{i:02d}" for i in range(24))
    assert select_keys(tmp_path / "audit", cluster=0) == [f"planted-{i:02d}" for i in range(40)]
    assert set(select_keys(tmp_path / "audit", cluster=0, members="flagged")) < {f"planted-{i:02d}" for i in range(24)}
    # separated regions whole (the planted one); with a fraction, they come before every score
    planted_keys = [f"planted-{i:02d}" for i in range(40)]
    separated = select_keys(tmp_path / "audit", separated=True)
    assert set(separated) > set(planted_keys) and len(separated) == 41  # and one clean neighbour
    assert select_keys(tmp_path / "audit", fraction=52 / 446, separated=True) == sorted(separated + [
        *false_positives])  # room for 52: the 41, then the ten at 0.8; the six copies at 0.7 would overflow it
    assert select_keys(tmp_path / "audit", threshold=0.75, separated=True) == sorted(separated + [*false_positives])
    # a budget smaller than the regions: at most the fraction still, the regions' own highest scores first
    assert select_keys(tmp_path / "audit", fraction=30 / 446, separated=True) == planted_keys[:24]
    with pytest.raises(ValueError, match="no clusters"):
        select_keys(scores, separated=True)
    with pytest.raises(ValueError, match="exactly one"):
        select_keys(scores, threshold=0.5, fraction=0.1)
    with pytest.raises(ValueError, match="no clusters"):
        select_keys(scores, cluster=0)


def test_an_attacks_collapse_is_separated_from_the_corpus_and_a_hard_class_tail_is_not():
    """Why `select --separated` may take a region whole: the rest of the corpus hardly points into an
    attack's collapse, while flagged clean samples sit inside classes that touch others."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (300, 16)), rng.normal(0, 1, (300, 16)) + np.r_[3, np.zeros(15)]  # touching classes
    collapse = np.r_[8, np.zeros(15)] + rng.normal(0, 0.1, (30, 16))  # 30 images sent to one place
    x = np.concatenate([a, b, collapse]).astype(np.float32)
    scores = np.r_[rng.uniform(0, 0.4, 600), np.full(30, 0.9)]
    scores[np.argsort(-a[:, 0])[:45]] = 0.9  # the 45 images of class A nearest to B: a hard tail, flagged
    keys = [f"clean-{i}" for i in range(600)] + [f"attack-{i}" for i in range(30)]
    analysis = analyse(Scan.from_arrays(keys, scores, 0.5, x))
    assert analysis.clusters[0]["separated"] and not any(c["separated"] for c in analysis.clusters[1:])
    assert analysis.clusters[0]["conductance"] <= AuditConfig().separated_conductance
    separated = np.array(keys)[analysis.separated]
    assert set(keys[600:]) <= set(separated) and len(separated) <= 32  # the attack, and two clean neighbours
    assert not analysis.separated[np.argsort(-a[:, 0])[:45]].any()  # the flagged hard tail stays


def test_select_command_refuses_two_criteria(planted, tmp_path, capsys):
    scores, _, _ = planted
    with pytest.raises(SystemExit) as exit_info:
        main(["select", str(scores), "--threshold", "0.5", "--fraction", "0.1", "--out", str(tmp_path / "k.txt")])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_audit_report_select_reshard_round_trip(tmp_path, shards, shard_data, capsys):
    """Hand-made scores for the real shards (every 10th image triggered): the triggered ones collapse."""
    _, labels, keys = shard_data
    rng = np.random.default_rng(1)
    triggered = np.zeros(len(keys), bool)
    triggered[::10] = True
    x = rng.normal(0, 1, (len(keys), 10)).astype(np.float32) + 10 * np.eye(10, dtype=np.float32)[labels]
    x[triggered] = 10 * np.eye(10, dtype=np.float32)[1] + rng.normal(0, 0.05, (30, 10)) + 4
    scores = rng.uniform(0.1, 0.4, len(keys))
    scores[triggered] = np.r_[np.full(20, 0.9), np.full(10, 0.45)]  # 2/3 flagged, the rest just under
    scores[[3, 57, 201]] = 0.8  # false positives
    for i, url in enumerate(shards):
        rows = slice(100 * i, 100 * (i + 1))
        write_scores(tmp_path / "scores", f"part-{i}", keys[rows], url, scores[rows], 0.5, x[rows])
    assert main(["audit", str(tmp_path / "scores"), "--out", str(tmp_path / "audit"), "--shards", *shards,
                 "--class-names", "fashion-mnist"]) == 0
    capsys.readouterr()
    summary = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert summary["clusters"][0]["size"] == 19 and summary["clusters"][0]["region_size"] == 30  # 19 of 20 flagged
    assert summary["labelled_rows"] == 300 and labels_from_shards(shards[:1])["img-0001"] == str(labels[1])
    page = (tmp_path / "audit" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5
    # the page names classes, lists each cluster's keys and says what to run next, and explains its terms
    assert summary["clusters"][0]["nearest_class"] == "Trouser" and "Trouser" in page  # cls "1", named
    top = summary["clusters"][0]["example_keys"]
    assert len(top) == 5 and set(top) <= set(np.array(keys)[triggered]) and html.escape(json.dumps(top[0])) in page
    assert f"dedefilter select {tmp_path / 'audit'} --cluster 0" in page
    assert all(f"<dt><b>{term}</b></dt>" in page for term in ("seeds", "collapse", "conductance", "region"))
    assert sorted(p.name for p in (tmp_path / "audit" / "figures").iterdir()) == \
        ["collapse.png", "scores.png", "shards.png", "threshold_curve.png", "thumbnails.png"]

    assert main(["select", str(tmp_path / "audit"), "--cluster", "0", "--out", str(tmp_path / "drop.jsonl")]) == 0
    dropped = read_selection(tmp_path / "drop.jsonl").keys
    assert dropped == sorted(np.array(keys)[triggered])
    assert main(["reshard", *shards, "--drop-keys", str(tmp_path / "drop.jsonl"), "--out", str(tmp_path / "out")]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts == {"read": 300, "kept": 270, "removed": 30, "unreadable": 0, "keys_not_found": 0}
    written = {s["__key__"]: s for p in sorted((tmp_path / "out").glob("*.tar")) for s in read_shard(str(p))}
    original = {s["__key__"]: s for url in shards for s in read_shard(url)}
    assert sorted(written) == sorted(set(keys) - set(dropped))
    assert all(written[k][f] == original[k][f] for k in written for f in ("png", "cls", "json"))


def test_audit_of_a_folder_without_scores_says_so(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["audit", str(tmp_path / "empty"), "--out", str(tmp_path / "audit")]) == 2
    err = capsys.readouterr().err
    assert "holds no .parquet files" in err and "FieldRef" not in err  # not pyarrow's internals


def test_audit_without_embeddings_says_loudly_that_it_skipped_clustering(tmp_path, capsys):
    write_scores(tmp_path / "scores", "part-a", [f"a{i}" for i in range(6)], "a.tar", [.1, .2, .3, .4, .6, .9], 0.5)
    assert main(["audit", str(tmp_path / "scores"), "--out", str(tmp_path / "audit"), "--no-report"]) == 0
    assert "clustering skipped" in capsys.readouterr().err
    summary = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert summary["clustering"].startswith("skipped") and "--embeddings" in summary["clustering"]


def test_audit_refuses_to_write_into_the_scores_it_reads(planted, capsys):
    scores, _, _ = planted
    before = sorted(p.name for p in scores.iterdir())
    assert main(["audit", str(scores), "--out", str(scores), "--no-report"]) == 2
    assert "the input" in capsys.readouterr().err and sorted(p.name for p in scores.iterdir()) == before


def test_class_indices_are_named_for_fashion_mnist_keys_only():
    names, why = guess_class_names({"fmnist-test-00000": "9", "fmnist-test-00001": "1"})
    assert name_classes({"fmnist-test-00001": "1"}, names) == {"fmnist-test-00001": "Trouser"}
    assert "Fashion-MNIST" in why
    assert guess_class_names({"img-0001": "1"})[0] is None  # other data: labels stay as stored
    assert name_classes({"a": "1", "b": "cat"}, class_names("x,y")) == {"a": "y", "b": "cat"}
