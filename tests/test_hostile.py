"""Hostile and odd input: each gets an error row with its reason or a clear message, and the run goes on.

Also covered elsewhere: a truncated member, a member with no image and non-image bytes under .png
(tests/test_stage.py); missing shards, refused before any work (tests/test_data_safety.py); garbage and pickle-payload detector
checkpoints and a detector for another encoder (tests/test_detector.py).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from PIL import Image

import dedefilter
from benchmarks.fuzz import damage_header
from dedefilter import Detector, Scorer, filter_shards, fixed, load_encoder
from dedefilter.cli import main
from dedefilter.data import decode_image
from dedefilter.detector import CheckpointError
from dedefilter.encoders import to_float
from dedefilter.model import DeDeModel
from dedefilter.shards import read_shard, write_image_shards
from dedefilter.stage import NON_FINITE


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return str(path)


def rows_of(result) -> dict:
    table = ds.dataset(str(result.parquet_dir), format="parquet").to_table()
    return {(row["url"], row["key"]): row for row in table.to_pylist()}


@pytest.fixture
def clean_members(shard_data):
    """Ten real images as (name, bytes) tar members, with a label member each."""
    images, labels, keys = shard_data
    members = []
    for image, label, key in zip(images[:10], labels[:10], keys[:10], strict=True):
        members += [(f"{key}.png", png(Image.fromarray(image))), (f"{key}.cls", str(label).encode())]
    return members


# --- images -------------------------------------------------------------------------------------

def test_grayscale_palette_rgba_and_16_bit_images_decode_to_the_same_rgb(shard_data):
    rgb = shard_data[0][3]  # a Fashion-MNIST image: gray content in three equal channels
    gray = rgb[..., 0]
    rgba = np.dstack([rgb, np.full(gray.shape, 77, np.uint8)])
    sixteen = gray.astype(np.uint16) * 257  # the same image at 16 bits per pixel
    variants = {
        "L": Image.fromarray(gray),
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(rgba),
        "P": Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=256),
        "I;16": Image.fromarray(sixteen),
    }
    assert Image.open(io.BytesIO(png(variants["I;16"]))).mode == "I;16"
    for mode, image in variants.items():
        decoded = decode_image(png(image))
        assert decoded.shape == (32, 32, 3) and decoded.dtype == np.uint8
        if mode == "P":  # an adaptive palette of a gray image keeps its grays up to quantisation
            assert np.abs(decoded.astype(int) - rgb).max() <= 4
        else:
            assert np.array_equal(decoded, rgb), mode


def test_very_small_and_very_large_images_are_resized_and_cropped():
    for size in [(1, 1), (1, 300), (300, 2), (4000, 3000)]:
        gradient = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :].repeat(size[1], axis=0)
        assert decode_image(png(Image.fromarray(gradient))).shape == (32, 32, 3)
    assert np.array_equal(decode_image(png(Image.new("L", (1, 1), 200))), np.full((32, 32, 3), 200, np.uint8))


BOMB_IN_A_FRESH_PROCESS = """
import io, resource
from PIL import Image
from dedefilter.data import decode_image
buffer = io.BytesIO()
Image.new("1", (9000, 9000)).save(buffer, format="PNG")  # 81 Mpixels: under PIL's own limit, over ours
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_image(buffer.getvalue())
except ValueError as err:
    print(err)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak)
"""


def test_a_decompression_bomb_is_refused_from_its_header_in_bounded_memory():
    env = dict(os.environ, PYTHONPATH=str(Path(dedefilter.__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", BOMB_IN_A_FRESH_PROCESS], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == ("image too large to decode (9000x9000 pixels; the limit is 67108864 pixels, "
                      "a guard against decompression bombs)")
    assert int(out[1]) < 20_000  # KiB of peak memory growth; decoding it would take ~320,000
    over_pils_limit = png(Image.new("1", (20_000, 20_000)))  # 400 Mpixels, ~1.2 GB once decoded to RGB
    assert len(over_pils_limit) < 100_000
    with pytest.raises(ValueError, match="image too large to decode .* decompression bombs"):
        decode_image(over_pils_limit)


# --- shards -------------------------------------------------------------------------------------

def test_odd_shards_give_error_rows_and_the_rest_is_scored(tmp_path, scorer, clean_members):
    (tmp_path / "a-directory.tar").mkdir()
    (tmp_path / "zero-bytes.tar").write_bytes(b"")
    bomb = png(Image.new("1", (20_000, 20_000)))
    urls = {
        "empty": write_tar(tmp_path / "empty.tar", []),
        "zero": str(tmp_path / "zero-bytes.tar"),
        "directory": str(tmp_path / "a-directory.tar"),
        "odd": write_tar(tmp_path / "odd.tar", clean_members[:4] + [("bomb.png", bomb), ("no-ext", b"x"),
                                                                    ("trick.__key__", b"other")]),
    }
    result = filter_shards(list(urls.values()), scorer, tmp_path / "out", num_workers=0, progress=False)
    rows = rows_of(result)
    errors = {key: row["reason"] for key, row in rows.items() if row["status"] == "error"}
    assert errors.keys() == {(urls["zero"], None), (urls["directory"], None),
                             (urls["odd"], "bomb"), (urls["odd"], "no-ext"), (urls["odd"], "trick")}
    assert errors[urls["zero"], None] == "cannot read shard (ReadError: empty file)"
    assert errors[urls["directory"], None].startswith("cannot read shard (IsADirectoryError: ")
    assert "image too large" in errors[urls["odd"], "bomb"]
    assert "no image field" in errors[urls["odd"], "no-ext"]
    assert "reserved field name" in errors[urls["odd"], "trick"]
    assert len(rows) == 2 + 5  # the two clean samples of odd.tar are scored; empty.tar has no rows
    assert result.balanced and result.markers["samples"] == 7
    assert result.unread == [urls["zero"], urls["directory"]]  # the run fails (the CLI exits 1)...
    assert [Path(p).name for p in result.shard_paths] == ["filtered-000000.tar", "filtered-000003.tar"]  # ...no tar


def test_a_shard_that_cannot_be_opened_is_an_error_row_even_for_root(tmp_path, scorer, clean_members):
    """A path that is a folder cannot be opened by anyone (``chmod 000`` does not stop root, who runs CI);
    a mode-000 file is checked too where the mode bits bind."""
    locked = write_tar(tmp_path / "locked.tar", clean_members)
    os.chmod(locked, 0)
    (tmp_path / "a-folder.tar").mkdir()
    urls = [str(tmp_path / "a-folder.tar")] + ([] if os.access(locked, os.R_OK) else [locked])
    result = filter_shards(urls, scorer, tmp_path / "out", num_workers=0, progress=False)
    rows = rows_of(result)
    assert set(rows) == {(url, None) for url in urls}
    assert all(row["status"] == "error" and row["reason"].startswith("cannot read shard (")
               for row in rows.values())
    assert result.unread == urls and result.balanced and result.markers["samples"] == len(urls)


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "webdataset pax headers"])
def test_a_damaged_header_mid_shard_is_skipped_and_every_later_sample_is_read(tmp_path, scorer, clean_members,
                                                                            shard_data, kind):
    """Python's tarfile stops at a header that fails its checksum (main lost the shard's last 5 of 10
    samples here); the reader resynchronises on the next valid header, as ``tar -tvf`` does."""
    if kind == "webdataset pax headers":  # webdataset's writer puts a pax header before each member
        images, labels, keys = shard_data
        url = write_image_shards(tmp_path, images[:10], keys[:10], labels[:10], shard_size=10)[0]
    else:
        url = write_tar(tmp_path / "damaged.tar", clean_members)
    header, name = damage_header(url, 10)  # the 6th sample's first member
    assert name.startswith("img-0005.")
    if kind == "tar.gz":
        Path(url + ".gz").write_bytes(gzip.compress(Path(url).read_bytes()))
        url += ".gz"
    samples = list(read_shard(url))
    assert [s["__key__"] for s in samples] == [f"img-{i:04d}" for i in range(10)]
    error = samples[5]["__error__"]
    assert re.fullmatch(rf"skipped tar bytes {header - (1024 if 'pax' in kind else 0)}-\d+: a damaged header of "
                        rf"member '{name}'; reading went on at the next valid header", error), error
    assert all("__error__" not in s for i, s in enumerate(samples) if i != 5)
    result = filter_shards([url], scorer, tmp_path / "out", num_workers=0, progress=False)
    rows = rows_of(result)
    assert len(rows) == 10 and [row["reason"] for row in rows.values() if row["status"] == "error"] == [error]
    assert result.balanced and not result.unread


def test_bytes_that_are_not_a_header_are_skipped_to_the_next_member_with_an_error_row(tmp_path, clean_members):
    """Six blocks of random bytes between two samples (headers are block-aligned, so whole blocks)."""
    url = write_tar(tmp_path / "inserted.tar", clean_members)
    with tarfile.open(url) as archive:
        seventh = archive.getmembers()[12].offset
    data = Path(url).read_bytes()
    Path(url).write_bytes(data[:seventh] + np.random.default_rng(0).bytes(3072) + data[seventh:])
    samples = list(read_shard(url))
    assert [s["__key__"] for s in samples] == [f"img-{i:04d}" for i in range(5)] + [None] + [
        f"img-{i:04d}" for i in range(5, 10)]  # the skip is found at img-0006's header, before img-0005 is yielded
    assert all("__error__" not in s for s in samples if s["__key__"] is not None)
    assert samples[5]["__error__"] == (f"skipped tar bytes {seventh}-{seventh + 3072}: a damaged header or bytes "
                                       "that are not a tar member; reading went on at the next valid header")


def test_a_shard_cut_between_members_is_reported_as_truncated(tmp_path, scorer, clean_members):
    url = write_tar(tmp_path / "cut.tar", clean_members)
    with tarfile.open(url) as archive:
        cut = archive.getmembers()[4].offset  # the end of the 2nd sample: every remaining byte is gone
    Path(url).write_bytes(Path(url).read_bytes()[:cut])
    samples = list(read_shard(url))
    assert [s["__key__"] for s in samples] == ["img-0000", "img-0001", None]
    assert samples[-1]["__error__"] == f"tar ends at byte {cut} without an end-of-archive block: the shard is truncated"


def test_duplicate_keys_first_is_scored_within_a_shard_and_counted_across_shards(tmp_path, scorer, clean_members,
                                                                                 capsys):
    a, a_cls, b, b_cls = clean_members[:4]
    first = write_tar(tmp_path / "first.tar", [a, a_cls, b, b_cls, a, a])  # img-0000 again, twice, later
    second = write_tar(tmp_path / "second.tar", [b, b_cls])  # img-0001 in another shard
    result = filter_shards([first, second], scorer, tmp_path / "out", num_workers=0, progress=False)
    rows = ds.dataset(str(result.parquet_dir)).to_table().to_pylist()
    first_rows = [(row["key"], row["status"]) for row in rows if row["url"] == first]
    assert [key for key, _ in first_rows] == ["img-0000", "img-0001", "img-0000", "img-0000"]
    assert [status == "error" for _, status in first_rows] == [False, False, True, True]
    reasons = [row["reason"] for row in rows if row["status"] == "error"]
    assert reasons == ["duplicate key 'img-0000': seen before in this shard, only the first is scored"] * 2
    assert result.duplicate_keys == 1 and result.balanced  # img-0001: scored in both shards


# --- encoders and checkpoints -------------------------------------------------------------------

def test_nan_and_infinite_embeddings_become_error_rows(tmp_path, detector, shards, shard_data):
    encoder = load_encoder("hostile_encoders:non_finite_for_extremes")
    images, _, keys = shard_data
    brightness = to_float(images).mean(dim=(1, 2, 3))
    expected = {key for key, b in zip(keys, brightness.tolist(), strict=True) if b > 0.3 or b < 0.1}
    assert 0 < len(expected) < 300
    for_it = Detector(detector.model, encoder.name, encoder.fingerprint, threshold=fixed(0.05))
    result = filter_shards(shards, Scorer(encoder, for_it), tmp_path / "out", num_workers=2, progress=False)
    rows = ds.dataset(str(result.parquet_dir)).to_table().to_pylist()
    assert {row["key"] for row in rows if row["status"] == "error"} == expected
    assert {row["reason"] for row in rows if row["status"] == "error"} == {NON_FINITE}
    assert all(np.isfinite(row["score"]) for row in rows if row["status"] != "error")
    assert result.balanced and len(rows) == 300


def test_a_checkpoint_whose_weights_are_for_another_image_size_is_refused(tmp_path, detector, encoder):
    bigger = Detector(DeDeModel(replace(detector.config, image_size=64), encoder.embed_dim), encoder.name, encoder.fingerprint)
    bigger.save(tmp_path / "det64.pt")
    checkpoint = torch.load(tmp_path / "det64.pt", weights_only=True)
    checkpoint["config"]["image_size"] = 32  # a file that claims 32 px but holds 64 px position embeddings
    torch.save(checkpoint, tmp_path / "det-mislabelled.pt")
    with pytest.raises(CheckpointError, match="config or weights do not match the DeDe model"):
        Detector.load(tmp_path / "det-mislabelled.pt", encoder.fingerprint)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\) RGB, got \(2, 1, 64, 64\)"):
        Scorer(encoder, bigger).score_pixels(torch.zeros(2, 1, 64, 64), ["a", "b"])  # any size is resized; not any layout


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_an_encoder_file_with_a_pickle_payload_never_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "dedefilter-encoder/1", "arch": "small_cnn", "state_dict": Payload()}, "evil.pt")
    code = main(["filter", "x.tar", "--encoder", "evil.pt", "--detector", "det.pt", "--out", "out"])
    assert code == 2 and "is not a readable encoder checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


# --- the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--workers", "-1"], "argument --workers: must be at least 0, got -1"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--batch-size", "many"], "argument --batch-size: invalid integer value: 'many'"),
    (["--threshold", "nan"], "argument --threshold: must be a finite number, got nan"),
    (["--overwrite", "--resume"], "argument --resume: not allowed with argument --overwrite"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_arguments_exit_2_with_the_reason(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["filter", "x.tar", "--encoder", "fmnist-badencoder", "--detector", "d.pt", "--out", "o", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_files_and_an_unusable_out_path_are_messages(tmp_path, detector, shards, capsys):
    detector.save(tmp_path / "det.pt")
    (tmp_path / "a-file").write_text("")
    common = [*shards, "--detector", str(tmp_path / "det.pt")]
    cases = [
        (["--encoder", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o1")], "encoder file .* does not exist"),
        (["--encoder", "no_such_module:factory", "--out", str(tmp_path / "o2")], "cannot import encoder factory"),
        (["--encoder", "fmnist-badencoder", "--out", str(tmp_path / "a-file" / "out")], "Not a directory"),
    ]
    for flags, message in cases:
        assert main(["filter", *common, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dedefilter filter: error:") and re.search(message, err), err
    assert main(["filter", *shards, "--encoder", "fmnist-badencoder", "--detector", str(tmp_path / "no.pt"),
                 "--out", str(tmp_path / "o3")]) == 2
    assert "detector checkpoint" in capsys.readouterr().err
