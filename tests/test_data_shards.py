"""Shard writing/reading, DALI index files, and the make_shards tool."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from groupvit_fast.data.make_shards import main as make_shards_main
from groupvit_fast.data.shards import (DataStats, ShardWriter, expand_shards, iter_tar_samples,
                                       shard_sample_count, split_member_name, write_dali_index)


def _img(fmt="JPEG", size=(40, 30), seed=0):
    buf = io.BytesIO()
    a = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(a).save(buf, fmt)
    return buf.getvalue()


def test_split_member_name_like_webdataset():
    assert split_member_name("dir/abc.seg.png") == ("dir/abc", "seg.png")
    assert split_member_name("abc.jpg") == ("abc", "jpg")
    assert split_member_name("d.x/abc") == ("d.x/abc", "")


def test_writer_reader_roundtrip_and_determinism(tmp_path):
    samples = [(f"k{i}", {"jpg": _img(seed=i), "txt": f"caption {i}"}) for i in range(5)]
    for run in ("a", "b"):
        with ShardWriter(str(tmp_path / run / "s-%03d.tar"), maxcount=2) as w:
            for k, s in samples:
                w.write(k, s)
        assert [os.path.basename(p) for p in w.closed_shards] == ["s-000.tar", "s-001.tar", "s-002.tar"]
        assert w.counts == [2, 2, 1]
    # fixed mtimes: identical input gives identical bytes
    assert (tmp_path / "a" / "s-000.tar").read_bytes() == (tmp_path / "b" / "s-000.tar").read_bytes()
    got = [kv for p in sorted(expand_shards(str(tmp_path / "a"))) for kv in iter_tar_samples(p)]
    assert [k for k, _ in got] == [k for k, _ in samples]
    assert got[3][1]["txt"] == b"caption 3" and got[3][1]["jpg"] == samples[3][1]["jpg"]
    assert shard_sample_count(str(tmp_path / "a" / "s-001.tar")) == 2
    assert not list((tmp_path / "a").glob("*.tmp"))
    with pytest.raises(ValueError, match="key"):
        ShardWriter(str(tmp_path / "c-%d.tar")).write("a.b", {"txt": "x"})


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar needed by DALI's wds2idx")
def test_index_matches_dalis_wds2idx(tmp_path):
    wds2idx = pytest.importorskip("wds2idx")
    with ShardWriter(str(tmp_path / "s-%03d.tar"), maxcount=10) as w:
        for i in range(4):
            w.write(f"k{i}", {"jpg": _img(seed=i), "txt": "x" * (i + 1), "mask.png": _img("PNG", seed=9)})
    tar = str(tmp_path / "s-000.tar")
    with wds2idx.IndexCreator(tar, str(tmp_path / "ref.idx"), verbose=False) as ic:
        ic.create_index()
    assert (tmp_path / "s-000.idx").read_text() == (tmp_path / "ref.idx").read_text()


def test_truncated_tar_yields_prefix_and_is_counted(tmp_path):
    with ShardWriter(str(tmp_path / "s-%03d.tar"), maxcount=100) as w:
        for i in range(20):
            w.write(f"k{i:02d}", {"jpg": _img(seed=i), "txt": f"c{i}"})
    p = str(tmp_path / "s-000.tar")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    stats = DataStats()
    got = list(iter_tar_samples(p, stats))
    assert 5 < len(got) < 20
    assert all(set(s) == {"jpg", "txt"} for _, s in got)  # the broken last sample is not yielded
    assert stats.skipped == {"truncated_tar": 1} and stats.bad[0].shard == p


def test_expand_shards(tmp_path):
    for i in range(3):
        (tmp_path / f"x-{i:06d}.tar").write_bytes(b"")
    assert expand_shards(str(tmp_path / "x-{000000..000002}.tar")) == [
        str(tmp_path / f"x-{i:06d}.tar") for i in range(3)]
    assert len(expand_shards(str(tmp_path / "*.tar"))) == 3 == len(expand_shards(str(tmp_path)))
    assert len(expand_shards([str(tmp_path / "x-000000.tar"), str(tmp_path / "x-00000[12].tar")])) == 3


def _folder(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rows = []
    for i in range(8):
        name = f"{i}.jpg" if i % 4 else f"{i}.webp"
        (imgs / name).write_bytes(_img("JPEG" if i % 4 else "WEBP", seed=i))
        rows.append((name, f"a dog number {i}"))
    (imgs / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (imgs / "cut.jpg").write_bytes(_img(seed=99)[:300])
    rows += [("bad.jpg", "broken image"), ("cut.jpg", "truncated image"), ("missing.jpg", "gone"),
             ("1.jpg", "   "), ("2.jpg", "dog")]
    return imgs, rows


@pytest.mark.parametrize("workers", [1, 2])
def test_make_shards_from_folder_and_tsv(tmp_path, capsys, workers):
    imgs, rows = _folder(tmp_path)
    tsv = tmp_path / "caps.tsv"
    tsv.write_text("caption\timage\n" + "".join(f"{c}\t{f}\n" for f, c in rows))
    out = tmp_path / "out"
    rc = make_shards_main(["--images", str(imgs), "--captions", str(tsv), "--out", str(out),
                           "--shard-size", "3", "--min-words", "2", "--workers", str(workers)])
    assert rc == 0
    rep = json.loads((out / "make_shards_report.json").read_text())
    assert rep["written"] == 8 and rep["samples_per_shard"] == [3, 3, 2]
    assert rep["dropped_by_reason"] == {"undecodable_image": 2, "missing_image": 1, "empty_caption": 1,
                                        "caption_shorter_than_2_words": 1}
    dropped = {d["key"] for d in rep["dropped_samples"]}
    assert dropped == {"bad.jpg", "cut.jpg", "missing.jpg", "1.jpg", "2.jpg"}
    assert "dropped" in capsys.readouterr().out
    samples = [s for p in expand_shards(str(out)) for _, s in iter_tar_samples(p)]
    assert all(os.path.exists(p[:-4] + ".idx") for p in expand_shards(str(out)))
    assert all(("jpg" in s or "png" in s) and s["txt"].startswith(b"a dog number") for s in samples)
    # the WEBP was re-encoded as JPEG
    assert json.loads(samples[0]["json"])["key"] == "0.webp" and samples[0]["jpg"][:2] == b"\xff\xd8"


def test_make_shards_headerless_csv_and_reshard(tmp_path):
    imgs, rows = _folder(tmp_path)
    csvp = tmp_path / "caps.csv"
    csvp.write_text("".join(f'"{c}",{f}\n' for f, c in rows[:8]))
    out = tmp_path / "a"
    assert make_shards_main(["--images", str(imgs), "--captions", str(csvp), "--no-header",
                             "--caption-column", "0", "--image-column", "1", "--out", str(out)]) == 0
    # re-shard (img2dataset-like input: jpg/txt/json), with an extra broken sample appended
    with ShardWriter(str(tmp_path / "extra-%03d.tar")) as w:
        w.write("zz", {"jpg": b"junk", "txt": "broken one here"})
    out2 = tmp_path / "b"
    assert make_shards_main(["--from-shards", str(out / "shard-000000.tar"), "--out", str(out2),
                             "--max-size", "20"]) == 0
    rep = json.loads((out2 / "make_shards_report.json").read_text())
    assert rep["written"] == 8 and rep["dropped"] == 0
    s = next(iter(iter_tar_samples(str(out2 / "shard-000000.tar"))))[1]
    assert max(Image.open(io.BytesIO(s["jpg"])).size) == 20  # --max-size re-encodes big images
    out3 = tmp_path / "c"
    make_shards_main(["--from-shards", str(tmp_path / "extra-000.tar"), "--out", str(out3)])
    rep = json.loads((out3 / "make_shards_report.json").read_text())
    assert rep["written"] == 0 and rep["dropped_by_reason"] == {"undecodable_image": 1}


def test_make_shards_help_has_example():
    r = subprocess.run([sys.executable, "-m", "groupvit_fast.data.make_shards", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "examples:" in r.stdout and "--captions" in r.stdout


def test_make_shards_image_template_for_cc3m_style_tsv(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"{i:09d}.jpg").write_bytes(_img(seed=i))
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("".join(f"caption {i}\thttp://example/{i}.jpg\n" for i in range(4)))
    out = tmp_path / "o"
    assert make_shards_main(["--images", str(imgs), "--captions", str(tsv), "--no-header",
                             "--caption-column", "0", "--image-template", "{index:09d}.jpg",
                             "--out", str(out)]) == 0
    rep = json.loads((out / "make_shards_report.json").read_text())
    assert rep["written"] == 3 and rep["dropped_by_reason"] == {"missing_image": 1}
