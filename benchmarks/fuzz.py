"""Fuzz the filter job with corrupted real shards: nothing crashes, the ledger balances, nothing is lost.

Each trial copies a real shard and corrupts it at random (seeded): flips a few bits, truncates it,
overwrites 512 bytes with random ones, or inserts random bytes. One job filters all corrupted shards;
then, shard by shard:
- the rows are exactly the samples the reader enumerates (a key group is one sample; an unreadable
  rest of a shard is one error row with key None);
- every sample that lies wholly before the first changed byte is scored exactly as in the clean shard
  (the last one may instead be an error row: a read error right after it is charged to it);
- every clean key with no row is covered by an error row of that shard: nothing vanishes silently.

Then the defects of issue 15, built by hand: a header that fails its checksum in the middle of each
clean shard (every later key must be read and scored as in the clean shard; ``tar -tvf`` recovers
them too), missing shards (refused before anything is written), outputs that are or hold an input,
``overwrite`` of a folder no filter run made (refused, the files untouched), and attacker-chosen keys
(spaces at either end, line breaks, twins differing by a trailing space) through filter -> select ->
reshard (the clean shard holds exactly the keys not selected; reshard into its own inputs is refused).

    python benchmarks/fuzz.py --trials 300    # writes benchmarks/results/fuzz.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import webdataset as wds

from dedefilter import (
    DeDeConfig,
    Detector,
    Scorer,
    filter_shards,
    for_false_positive_rate,
    load_encoder,
    train_model,
)
from dedefilter.audit import read_selection, select, write_selection
from dedefilter.data import fashion_mnist
from dedefilter.encoders import BACKDOORED_ENCODER
from dedefilter.reshard import reshard
from dedefilter.shards import read_shard, split_member_name, write_image_shards

CORRUPTIONS = ("flip", "truncate", "overwrite", "insert")
# keys an attacker can choose: spaces at either end, line breaks, a Unicode line separator, and keys that
# differ from another only by a trailing space (a stripped key list would drop or keep the wrong sample)
ODD_KEYS = (" lead", "trail ", "new\nline", "cr\rkey", "  ", "tab\tkey", "uni-\u00e9", "\r\n", "x\u2028y")


@dataclass(frozen=True)
class Trial:
    path: str
    source: str
    kind: str
    first_change: int  # offset of the first byte that differs from the clean shard


def corrupt(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    kind = CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))]
    if kind == "flip":
        out = bytearray(data)
        for position in rng.choice(len(data), size=int(rng.integers(1, 9)), replace=False):
            out[position] ^= 1 << int(rng.integers(8))
        return bytes(out), kind
    if kind == "truncate":
        return data[:int(rng.integers(len(data)))], kind
    start = int(rng.integers(len(data) - 512))
    if kind == "overwrite":
        return data[:start] + rng.bytes(512) + data[start + 512:], kind
    return data[:start] + rng.bytes(int(rng.integers(1, 2048))) + data[start:], kind


def first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    differs = np.flatnonzero(np.frombuffer(a[:n], np.uint8) != np.frombuffer(b[:n], np.uint8))
    return int(differs[0]) if len(differs) else n


def sample_ends(url: str) -> dict[str, int]:
    """Each clean sample's key -> the offset just past its last member's data blocks."""
    ends: dict[str, int] = {}
    with tarfile.open(url) as archive:
        for member in archive.getmembers():
            key, _ = split_member_name(member.name)
            ends[key] = max(ends.get(key, 0), member.offset_data + -(-member.size // 512) * 512)
    return ends


def damage_header(url: str, member_index: int) -> tuple[int, str]:
    """Flip a byte inside a member's own ustar header (its mode field); returns (that header's offset, name)."""
    with tarfile.open(url) as archive:
        member = archive.getmembers()[member_index]
    header = member.offset_data - 512  # after any pax header of its own
    data = bytearray(Path(url).read_bytes())
    data[header + 100] ^= 0xFF
    Path(url).write_bytes(data)
    return header, member.name


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def refused(run, error: type[Exception]) -> bool:
    try:
        run()
    except error:
        return True
    return False


def hand_built(clean_urls: list[str], scorer: Scorer, work_dir: Path, clean_scores: dict[str, float]) -> dict:
    """The hand-built cases of the module docstring: figures, and a problem for each broken promise."""
    problems = []
    directory = work_dir / "bad-header"
    directory.mkdir(parents=True, exist_ok=True)
    damaged, later = [], []  # per shard: the keys after the damaged sample
    for i, url in enumerate(clean_urls):
        path = directory / f"bad-header-{i:05d}.tar"
        shutil.copy(url, path)
        keys = list(sample_ends(url))
        middle = len(keys) // 2
        with tarfile.open(url) as archive:
            first_member = next(j for j, m in enumerate(archive.getmembers())
                                if split_member_name(m.name)[0] == keys[middle])
        damage_header(str(path), first_member)
        damaged.append(str(path))
        later.append(keys[middle + 1:])
    result = filter_shards(damaged, scorer, work_dir / "bad-header-scores", num_workers=0, progress=False,
                           overwrite=True)
    rows = ds.dataset(str(result.parquet_dir), format="parquet").to_table().to_pylist()
    scored = {(row["url"], row["key"]): row for row in rows if row["status"] != "error"}
    recovered = sum(1 for url, keys in zip(damaged, later, strict=True) for key in keys
                    if (url, key) in scored and scored[url, key]["score"] == clean_scores[key])
    after = sum(len(keys) for keys in later)
    skips = sum(1 for row in rows if row["status"] == "error" and row["reason"].startswith("skipped tar bytes"))
    if recovered != after or skips != len(damaged) or not result.balanced:
        problems.append(f"bad header mid-shard: {recovered} of {after} later keys recovered, {skips} skip rows "
                        f"for {len(damaged)} damaged headers, balanced {result.balanced}")

    clean_dir = Path(clean_urls[0]).parent
    before = tree(clean_dir)
    missing = [str(work_dir / "no-such-dir" / "shard-000000.tar"), *clean_urls]
    checks = {
        "missing_shards_refused": refused(lambda: filter_shards(missing, scorer, work_dir / "missing-out",
                                                                num_workers=0, progress=False), FileNotFoundError)
        and not (work_dir / "missing-out").exists(),
        "out_is_the_inputs_folder_refused": refused(lambda: filter_shards(clean_urls, scorer, clean_dir, num_workers=0,
                                                                          progress=False, overwrite=True), ValueError),
        "out_is_an_input_refused": refused(lambda: filter_shards(clean_urls, scorer, clean_urls[0], num_workers=0,
                                                                 progress=False, overwrite=True), ValueError),
        "overwrite_of_a_folder_no_run_made_refused": refused(
            lambda: filter_shards(clean_urls[:1], scorer, work_dir / "corrupted", num_workers=0, progress=False,
                                  overwrite=True), FileExistsError),
    }
    checks["inputs_unchanged"] = tree(clean_dir) == before
    odd = odd_keys_through_select_and_reshard(clean_urls, scorer, work_dir / "odd-keys")
    checks |= odd.pop("checks")
    problems += [f"hand-built: {name} is false" for name, ok in checks.items() if not ok]
    return {"bad_header_shards": len(damaged), "keys_after_bad_header": after,
            "keys_recovered_after_bad_header": recovered, "bad_header_skip_rows": skips,
            "bad_header_balanced": result.balanced, **odd, **checks, "problems": problems}


def odd_keys_through_select_and_reshard(clean_urls: list[str], scorer: Scorer, work_dir: Path) -> dict:
    """Shards whose keys are the odd ones (and twins "k" / "k "), through filter -> select -> reshard: the
    clean shards must hold exactly the keys not selected; reshard into its own inputs is refused."""
    samples = [s for url in clean_urls for s in read_shard(url)][:2 * len(ODD_KEYS)]
    keys = list(ODD_KEYS) + [f"twin-{i}{' ' * (i % 2)}" for i in range(len(samples) - len(ODD_KEYS))]
    folder = work_dir / "in"
    folder.mkdir(parents=True, exist_ok=True)
    url = str(folder / "odd-000000.tar")
    with wds.TarWriter(url) as writer:
        for sample, key in zip(samples, keys, strict=True):
            writer.write({"__key__": key, **{k: v for k, v in sample.items() if not k.startswith("__")}})
    read_back = [s["__key__"] for s in read_shard(url)]
    scored = filter_shards([url], scorer, work_dir / "scores", num_workers=0, progress=False, write_shards=False)
    selection = select(scored.parquet_dir, fraction=0.5)
    listed = read_selection(write_selection(selection, work_dir / "drop.jsonl")).keys
    counts = reshard([url], set(listed), work_dir / "clean")
    kept = [s["__key__"] for s in read_shard(str(work_dir / "clean" / "odd-000000.tar"))]
    before = tree(folder)
    checks = {
        "odd_keys_round_trip": read_back == keys and listed == selection.keys
        and kept == [k for k in keys if k not in set(listed)] and counts.removed == len(listed),
        "reshard_into_its_inputs_refused": refused(lambda: reshard([url], set(listed), folder), ValueError)
        and tree(folder) == before,
    }
    return {"odd_keys": len(keys), "odd_keys_selected": len(listed), "odd_keys_kept": len(kept), "checks": checks}


def make_trials(clean_urls: list[str], directory: Path, count: int, seed: int) -> list[Trial]:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    trials = []
    for i in range(count):
        source = clean_urls[int(rng.integers(len(clean_urls)))]
        data = Path(source).read_bytes()
        bad, kind = corrupt(data, rng)
        path = directory / f"fuzz-{i:05d}.tar"
        path.write_bytes(bad)
        trials.append(Trial(str(path), source, kind, first_difference(data, bad)))
    return trials


def audit(trials: list[Trial], parquet_dir: Path, clean_scores: dict[str, float]) -> list[str]:
    """What went wrong, per the rules in the module docstring (an empty list: nothing)."""
    rows_by_url: dict[str, list[dict]] = {}
    for row in ds.dataset(str(parquet_dir), format="parquet").to_table().to_pylist():
        rows_by_url.setdefault(row["url"], []).append(row)
    problems = []
    for trial in trials:
        rows = rows_by_url.get(trial.path, [])
        where = f"{trial.path} ({trial.kind} at byte {trial.first_change})"
        seen = sum(1 for _ in read_shard(trial.path))
        if len(rows) != seen:
            problems.append(f"{where}: {len(rows)} rows for {seen} samples read")
        by_key = {row["key"]: row for row in rows}
        has_error = any(row["status"] == "error" for row in rows)
        ends = sample_ends(trial.source)
        intact = [key for key, end in ends.items() if end <= trial.first_change]
        for key in intact[:-1]:
            row = by_key.get(key)
            if row is None or row["status"] == "error" or row["score"] != clean_scores[key]:
                problems.append(f"{where}: intact sample {key} not scored as in the clean shard: {row}")
        if intact and intact[-1] not in by_key:
            problems.append(f"{where}: intact sample {intact[-1]} has no row")
        missing = [key for key in ends if key not in by_key]
        if missing and not has_error:
            problems.append(f"{where}: {len(missing)} samples vanished without an error row")
    return problems


def fuzz(clean_urls: list[str], scorer: Scorer, work_dir: Path, trials: int, seed: int = 0,
         num_workers: int = 0) -> dict:
    """Run ``trials`` corrupted copies of ``clean_urls`` through one filter job and audit the result."""
    clean = filter_shards(clean_urls, scorer, work_dir / "clean-scores", num_workers=0, progress=False, overwrite=True)
    clean_rows = ds.dataset(str(clean.parquet_dir), format="parquet").to_table(columns=["key", "score"]).to_pylist()
    clean_scores = {row["key"]: row["score"] for row in clean_rows}
    made = make_trials(clean_urls, work_dir / "corrupted", trials, seed)
    start = time.perf_counter()
    result = filter_shards([t.path for t in made], scorer, work_dir / "fuzz-scores", num_workers=num_workers,
                           progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    problems = audit(made, result.parquet_dir, clean_scores)
    by_hand = hand_built(clean_urls, scorer, work_dir, clean_scores)
    problems += by_hand.pop("problems")
    return {"corrupted_shards": trials, "seed": seed, "by_kind": dict(Counter(t.kind for t in made)),
            "samples_in": result.markers["samples"], "rows": sum(result.ledger.values()), **result.ledger,
            "balanced": result.balanced, "hand_built": by_hand, "unaccounted": len(problems),
            "problems": problems[:20], "job_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/fuzz.json")
    args = parser.parse_args()
    encoder = load_encoder(BACKDOORED_ENCODER)
    train_images, _ = fashion_mnist("train")
    small = replace(DeDeConfig(), dim=64, heads=2, encoder_depth=1, decoder_depth=1, epochs=1, batch_size=128)
    model, _ = train_model(encoder, train_images[:1000], small, log=lambda *_: None)
    images, labels = fashion_mnist("test")
    detector = Detector(model, encoder.name, encoder.fingerprint)
    clean_scores = Scorer(encoder, detector).score_array(images[1000:1500], [f"ref-{i}" for i in range(500)])
    detector = detector.with_threshold(for_false_positive_rate(clean_scores, 0.05))  # a sensible cut, not a tuned one
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_image_shards(Path(tmp) / "clean", images[:200], [f"fmnist-{i:05d}" for i in range(200)],
                                  labels[:200], shard_size=20)
        report = fuzz(urls, Scorer(encoder, detector), Path(tmp), args.trials, args.seed)
    report["command"] = f"python benchmarks/fuzz.py --trials {args.trials} --seed {args.seed}"
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "problems"}))


if __name__ == "__main__":
    main()
