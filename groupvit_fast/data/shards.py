"""Webdataset shard writing/reading shared by the shard tools, the synthetic dataset and the loaders.

A shard is a plain tar whose members are ``<key>.<ext>``; consecutive members with the same key form
one sample (webdataset convention).  Next to every shard we write the DALI index (``.idx``, format
``v1.2``: one line per sample listing ``ext offset size name`` per component) so
``fn.readers.webdataset`` can seek without scanning the tar first.  Shards are written to a temporary
name and renamed into place, so a crashed writer never leaves a half shard that looks complete.
"""
from __future__ import annotations

import io
import os
import tarfile
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

IMAGE_EXTS = ("jpg", "png", "jpeg")
TEXT_EXTS = ("txt", "text")


def split_member_name(name: str) -> Tuple[str, str]:
    """``dir/abc.seg.png`` -> (``dir/abc``, ``seg.png``): the key ends at the first dot of the basename,
    exactly like webdataset and DALI's ``wds2idx``."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def collect_tar_samples(tf: "tarfile.TarFile", samples: List[List[Tuple[str, int, int, str]]]
                        ) -> int:
    """Append the components ``(ext, data offset, size, name)`` of every sample of ``tf`` to
    ``samples``, one list per run of members sharing a key. Filled in place, so a caller that
    catches a read error keeps what was read before it. Returns the archive offset reached."""
    last = None
    for m in tf:
        if not m.isfile():
            continue
        key, ext = split_member_name(m.name)
        if not key or not ext:
            continue
        if key != last:
            samples.append([])
            last = key
        samples[-1].append((ext, m.offset_data, m.size, m.name))
    return tf.offset


def write_dali_index(tar_path: str, idx_path: Optional[str] = None) -> str:
    """Write the DALI ``v1.2`` index of ``tar_path`` (offsets of each component's data)."""
    idx_path = idx_path or os.path.splitext(tar_path)[0] + ".idx"
    samples: List[List[Tuple[str, int, int, str]]] = []
    with tarfile.open(tar_path, "r:") as tf:
        collect_tar_samples(tf, samples)
    if not samples:
        raise ValueError(f"{tar_path}: empty webdataset shard, no index written")
    tmp = idx_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"v1.2 {len(samples)}\n")
        for comps in samples:
            f.write(" ".join(f"{e} {o} {s} {n}" for e, o, s, n in comps) + "\n")
    os.replace(tmp, idx_path)
    return idx_path


class ShardWriter:
    """Write samples (dict ext -> bytes/str) into ``pattern % shard_no`` tars of ``maxcount`` samples.

    ``pattern`` is a printf pattern such as ``out/train-%06d.tar``.  ``closed_shards`` lists the
    finished shard paths in order.
    """

    def __init__(self, pattern: str, maxcount: int = 10000, write_index: bool = True,
                 start_shard: int = 0):
        if "%" not in pattern:
            raise ValueError(f"shard pattern needs a %d/%06d field, got {pattern!r}")
        self.pattern = pattern
        self.maxcount = int(maxcount)
        self.write_index = write_index
        self.shard_no = start_shard
        self.closed_shards: List[str] = []
        self.counts: List[int] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._count = 0
        self._path = None
        d = os.path.dirname(pattern)
        if d:
            os.makedirs(d, exist_ok=True)

    def _open(self):
        self._path = self.pattern % self.shard_no
        self._tar = tarfile.open(self._path + ".tmp", "w:", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def write(self, key: str, sample: Dict[str, object]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self._tar is None:
            self._open()
        mtime = 0  # fixed mtime: identical inputs give byte-identical shards
        for ext, data in sample.items():
            if isinstance(data, str):
                data = data.encode("utf-8")
            if not isinstance(data, (bytes, bytearray)):
                raise TypeError(f"sample {key}.{ext}: expected bytes or str, got {type(data).__name__}")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = mtime
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(bytes(data)))
        self._count += 1
        if self._count >= self.maxcount:
            self._close_current()

    def _close_current(self):
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self._path + ".tmp", self._path)
        if self.write_index:
            write_dali_index(self._path)
        self.closed_shards.append(self._path)
        self.counts.append(self._count)
        self._tar = None
        self.shard_no += 1

    def close(self) -> List[str]:
        self._close_current()
        return self.closed_shards

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None and self._tar is not None:
            self._tar.close()
            try:
                os.remove(self._path + ".tmp")
            except OSError:
                pass
            self._tar = None
            return False
        self.close()
        return False


@dataclass
class BadSample:
    shard: str
    key: str
    reason: str

    def __str__(self):
        return f"{self.shard}:{self.key}: {self.reason}"


@dataclass
class DataStats:
    """Counts of what a reader/loader skipped, with where (shard, key) and why."""
    good: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)
    bad: List[BadSample] = field(default_factory=list)
    max_listed: int = 1000
    pipeline_restarts: int = 0

    _seen: set = field(default_factory=set, repr=False)

    def add_bad(self, shard: str, key: str, reason: str, kind: str) -> None:
        """Count a bad sample once, however often it is met (every epoch, pipeline replays)."""
        if (shard, key, kind) in self._seen:
            return
        self._seen.add((shard, key, kind))
        self.skipped[kind] = self.skipped.get(kind, 0) + 1
        if len(self.bad) < self.max_listed:
            self.bad.append(BadSample(shard, key, reason))

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"good={self.good} skipped={self.n_skipped} ({kinds}) "
                f"pipeline_restarts={self.pipeline_restarts}")

    def as_dict(self) -> dict:
        return dict(good=self.good, skipped=dict(self.skipped), pipeline_restarts=self.pipeline_restarts,
                    bad=[dict(shard=b.shard, key=b.key, reason=b.reason) for b in self.bad])

    def merge(self, other: "DataStats") -> None:
        self.good += other.good
        for k, v in other.skipped.items():
            self.skipped[k] = self.skipped.get(k, 0) + v
        self.bad.extend(other.bad[: max(0, self.max_listed - len(self.bad))])
        self.pipeline_restarts += other.pipeline_restarts


def iter_tar_samples(path: str, stats: Optional[DataStats] = None
                     ) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` from one shard, grouping consecutive members by key.

    A truncated or corrupt tar ends the shard early: the samples read so far are yielded, the rest is
    counted as ``truncated_tar`` in ``stats`` (never raised), so one bad shard cannot stop a run.
    """
    cur_key, cur = None, {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = split_member_name(m.name)
                if not key:
                    continue
                f = tf.extractfile(m)
                data = f.read() if f is not None else b""
                if len(data) != m.size:
                    raise tarfile.ReadError(f"member {m.name} truncated ({len(data)} of {m.size} bytes)")
                if key != cur_key:
                    if cur_key is not None:
                        yield cur_key, cur
                    cur_key, cur = key, {}
                cur[ext] = data
            end = tf.offset
        if os.path.getsize(path) < end + 1024:
            # no end-of-archive blocks: the file was cut at a member boundary, so the last sample
            # may be missing components; tarfile itself ends silently there
            raise tarfile.ReadError(f"no end-of-archive marker after byte {end}")
    except (tarfile.TarError, OSError, EOFError) as e:
        if stats is not None:
            stats.add_bad(path, cur_key or "<start>", f"truncated/corrupt tar: {e}", "truncated_tar")
        # the sample being assembled when the tar broke may be missing components: drop it
        return
    if cur_key is not None:
        yield cur_key, cur


def shard_sample_count(path: str) -> int:
    """Number of samples in a shard: from the DALI index when present, else by scanning the tar."""
    idx = os.path.splitext(path)[0] + ".idx"
    if os.path.exists(idx) and os.path.getmtime(idx) >= os.path.getmtime(path) - 1:
        with open(idx) as f:
            head = f.readline().split()
        if len(head) == 2 and head[0].startswith("v1"):
            return int(head[1])
    return sum(1 for _ in iter_tar_samples(path))


def expand_shards(spec) -> List[str]:
    """Shard list from a list, a glob, a directory, or a brace pattern ``a-{000000..000009}.tar``."""
    import glob
    import re
    if isinstance(spec, (list, tuple)):
        out: List[str] = []
        for s in spec:
            out.extend(expand_shards(s))
        return out
    spec = os.path.expanduser(str(spec))
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        a, b = m.group(1), m.group(2)
        width = len(a)
        return [spec[:m.start()] + str(i).zfill(width) + spec[m.end():]
                for i in range(int(a), int(b) + 1)]
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(spec))
    return [spec]


def now() -> float:
    return time.perf_counter()
