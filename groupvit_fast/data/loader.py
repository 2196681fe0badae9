"""Training/eval loaders over webdataset shards: NVIDIA DALI (CPU or nvJPEG) and a plain-PyTorch
fallback, behind one interface (the data loader contract in the team notes)::

    loader = build_train_loader(cfg, rank=r, world_size=w, batch_size=B, seed=s, epoch=0, device=dev)
    len(loader)                       # batches per epoch per rank
    for images, texts in loader:      # images float [B,3,H,W] on dev, texts int64 [B,1+K,77] ([B,77] if K=0)
        ...                           # one epoch; the next `for` runs the next epoch
    loader.state_dict() / loader.load_state_dict(sd)   # resume at the same position of the same order
    loader.stats                      # DataStats: skipped samples with shard/key and why

Bad data never stops a run.  Before any decoding, every shard's DALI index (or a scan of the tar
when it has none) is checked: samples with a missing image or caption, an empty caption, or lying
beyond the end of a truncated tar are counted and left out of a *filtered index* handed to DALI
(the tar itself is never rewritten, so the good samples of a truncated shard are still used).
Whitespace-only captions are dropped from batches (fixed batch size kept by carrying samples over).
A corrupt image that reaches DALI's decoder aborts its pipeline: the loader then decode-checks the
rank's images with PIL, adds the offenders to the filtered index, rebuilds the pipeline at the same
position and goes on; if the failure cannot be located it finishes on the torch backend.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from .config import DataConfig
from .shards import (IMAGE_EXTS, TEXT_EXTS, DataStats, collect_tar_samples, expand_shards,
                     split_member_name)


# ------------------------------------------------------------------------------------ shard index

@dataclass(frozen=True)
class SampleRef:
    shard: str
    key: str
    img_ext: str
    img_off: int
    img_size: int
    txt_ext: str
    txt_off: int
    txt_size: int

    @property
    def where(self) -> str:
        return f"{self.shard}:{self.key}"


def _read_index_file(idx_path: str) -> Optional[List[List[Tuple[str, int, int, str]]]]:
    try:
        with open(idx_path) as f:
            head = f.readline().split()
            if len(head) != 2 or not head[0].startswith("v1"):
                return None
            out = []
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                if len(parts) % 4:
                    return None
                out.append([(parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3])
                            for i in range(0, len(parts), 4)])
            return out
    except (OSError, ValueError):
        return None


def _scan_tar(path: str, stats: DataStats) -> List[List[Tuple[str, int, int, str]]]:
    """Components (ext, data offset, size, name) of a tar, stopping cleanly where it is broken."""
    import tarfile
    out: List[List[Tuple[str, int, int, str]]] = []
    try:
        with tarfile.open(path, "r:") as tf:
            end = collect_tar_samples(tf, out)
        if os.path.getsize(path) < end + 1024:
            raise tarfile.ReadError(f"no end-of-archive marker after byte {end}")
    except (tarfile.TarError, OSError, EOFError) as e:
        last = split_member_name(out[-1][0][3])[0] if out else None
        stats.add_bad(path, last or "<start>", f"truncated/corrupt tar: {e}", "truncated_tar")
        if out:
            out.pop()  # the sample being read when the tar broke may lack components
    return out


def index_shards(shards: Sequence[str], stats: DataStats, exclude: Set[Tuple[str, str]] = frozenset()
                 ) -> List[SampleRef]:
    """Every usable sample of ``shards`` as a SampleRef; problems are counted in ``stats``."""
    refs: List[SampleRef] = []
    for shard in shards:
        if not os.path.exists(shard):
            stats.add_bad(shard, "<shard>", "shard file not found", "missing_shard")
            continue
        fsize = os.path.getsize(shard)
        idx_path = os.path.splitext(shard)[0] + ".idx"
        samples = None
        if os.path.exists(idx_path) and os.path.getmtime(idx_path) >= os.path.getmtime(shard) - 1:
            samples = _read_index_file(idx_path)
        if samples is None:
            samples = _scan_tar(shard, stats)
        truncated = False
        for comps in samples:
            key = split_member_name(comps[0][3])[0]
            by_ext = {e: (o, s) for e, o, s, _ in comps}
            if any(o + s > fsize for o, s in by_ext.values()):
                if not truncated:
                    stats.add_bad(shard, key, f"tar truncated at {fsize} bytes: this and later samples "
                                              f"lost", "truncated_tar")
                    truncated = True
                stats.skipped["truncated_sample"] = stats.skipped.get("truncated_sample", 0) + 1
                continue
            img_ext = next((e for e in IMAGE_EXTS if e in by_ext), None)
            txt_ext = next((e for e in TEXT_EXTS if e in by_ext), None)
            if img_ext is None:
                stats.add_bad(shard, key, f"no image component (found {sorted(by_ext)})", "missing_image")
                continue
            if txt_ext is None:
                stats.add_bad(shard, key, f"no caption component (found {sorted(by_ext)})", "missing_caption")
                continue
            if by_ext[txt_ext][1] == 0:
                stats.add_bad(shard, key, "empty caption", "empty_caption")
                continue
            if by_ext[img_ext][1] == 0:
                stats.add_bad(shard, key, "empty image file", "corrupt_image")
                continue
            if (shard, key) in exclude:
                continue
            refs.append(SampleRef(shard, key, img_ext, by_ext[img_ext][0], by_ext[img_ext][1],
                                  txt_ext, by_ext[txt_ext][0], by_ext[txt_ext][1]))
    return refs


def write_filtered_indices(refs: Sequence[SampleRef], out_dir: str) -> Tuple[List[str], List[str]]:
    """DALI ``v1.2`` index files listing exactly ``refs`` (grouped per shard, in order)."""
    os.makedirs(out_dir, exist_ok=True)
    per: Dict[str, List[SampleRef]] = {}
    for r in refs:
        per.setdefault(r.shard, []).append(r)
    paths, idxs = [], []
    for shard, rs in per.items():
        body = "".join(f"{r.img_ext} {r.img_off} {r.img_size} {r.key}.{r.img_ext} "
                       f"{r.txt_ext} {r.txt_off} {r.txt_size} {r.key}.{r.txt_ext}\n" for r in rs)
        text = f"v1.2 {len(rs)}\n" + body
        h = hashlib.sha1((os.path.abspath(shard) + "\n" + text).encode()).hexdigest()[:16]
        idx = os.path.join(out_dir, f"{h}.idx")
        if not os.path.exists(idx):
            tmp = f"{idx}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, idx)
        paths.append(shard)
        idxs.append(idx)
    return paths, idxs


class _ByteReader:
    """Random access to components through the index offsets (one open file per shard)."""

    def __init__(self):
        self._files: Dict[str, object] = {}

    def read(self, path: str, off: int, size: int) -> bytes:
        f = self._files.get(path)
        if f is None:
            if len(self._files) > 64:
                for g in self._files.values():
                    g.close()
                self._files.clear()
            f = self._files[path] = open(path, "rb")
        f.seek(off)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{path}: short read at {off} ({len(data)} of {size} bytes)")
        return data

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()


def decode_image(data: bytes):
    """PIL RGB image, fully decoded (truncation raises here, not later in a transform)."""
    from PIL import Image
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def validate_image_bytes(data: bytes) -> Optional[str]:
    """None when ``data`` decodes completely, else the reason."""
    try:
        img = decode_image(data)
        if img.width < 1 or img.height < 1:
            return "empty image"
    except Exception as e:  # PIL raises many types for broken files
        return f"undecodable image: {type(e).__name__}: {e}"
    return None


def _mix_seed(*parts: int) -> int:
    h = hashlib.sha1(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def _caption(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").strip()


def _resolve_shards(cfg: DataConfig) -> List[str]:
    if cfg.shards is None:
        from .synthetic import ensure_shards
        return ensure_shards(cfg.synthetic, cfg.cache_dir, splits=("train",))["train"]
    shards = expand_shards(cfg.shards)
    if not shards:
        raise FileNotFoundError(f"DataConfig.shards={cfg.shards!r} matches no shard files")
    return shards


def _cache_root(cfg: DataConfig) -> str:
    from .synthetic import default_cache_dir
    return cfg.cache_dir or default_cache_dir()


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except Exception:
        return False


# ------------------------------------------------------------------------------------ base

class _TrainLoaderBase:
    backend = "?"

    def __init__(self, cfg: DataConfig, *, rank: int, world_size: int, batch_size: int, seed: int,
                 epoch: int, device, refs: List[SampleRef], stats: DataStats,
                 exclude: Optional[Set[Tuple[str, str]]] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.position = int(epoch), 0
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.refs = refs
        self.stats = stats
        self.exclude: Set[Tuple[str, str]] = set(exclude or ())
        total = cfg.length if cfg.length is not None else len(refs)
        self._len = total // (batch_size * world_size)
        if self._len < 1:
            raise ValueError(f"{len(refs)} usable samples ({stats.summary()}) cannot fill one batch of "
                             f"{batch_size} on each of {world_size} ranks")

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, position=self.position, seed=self.seed, rank=self.rank,
                    world_size=self.world_size, batch_size=self.batch_size, backend=self.backend,
                    excluded=sorted(list(k) for k in self.exclude))

    def load_state_dict(self, sd: dict) -> None:
        for k in ("seed", "world_size", "batch_size"):
            if k in sd and sd[k] != getattr(self, k):
                raise ValueError(f"loader state has {k}={sd[k]} but this loader has {k}={getattr(self, k)}: "
                                 f"the data order would differ")
        self.epoch, self.position = int(sd["epoch"]), int(sd["position"])
        if self.position >= self._len:
            self.epoch, self.position = self.epoch + 1, 0
        new = {tuple(x) for x in sd.get("excluded", [])} - self.exclude
        if new:
            self.exclude |= new

    def _texts(self, captions: Sequence[str], sample_ids: Sequence[int]) -> torch.Tensor:
        from .prompts import PromptBuilder
        pb = PromptBuilder(self.cfg.multi_label, context_length=self.cfg.context_length,
                           templates=self.cfg.prompt_templates)
        rngs = [np.random.default_rng([self.seed, self.epoch, int(i)]) for i in sample_ids]
        return pb.batch(list(captions), rngs)

    def _finish(self, images: torch.Tensor, batch_no: int) -> torch.Tensor:
        if self.cfg.erasing_p > 0:
            g = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, self.rank, batch_no, 17))
            random_erasing_ = _erasing()
            random_erasing_(images, self.cfg.erasing_p, g)
        return images


def _erasing():
    from .transforms import random_erasing_
    return random_erasing_


# ------------------------------------------------------------------------------------ torch backend

class _EpochBatches(torch.utils.data.IterableDataset):
    """Batches ``start..n_batches-1`` of one epoch; worker w makes batches w, w+W, ... (the
    DataLoader returns them round-robin, so the order is independent of the worker count)."""

    def __init__(self, loader: "TorchTrainLoader", order: np.ndarray, spares: np.ndarray, start: int,
                 transform):
        self.cfg = loader.cfg
        self.transform = transform
        self.refs = loader.refs
        self.order, self.spares = order, spares
        self.start, self.n_batches = start, len(loader)
        self.bs = loader.batch_size
        self.seed, self.epoch, self.rank = loader.seed, loader.epoch, loader.rank
        self.k, self.context_length = loader.cfg.multi_label, loader.cfg.context_length
        self.templates = loader.cfg.prompt_templates
        self.exclude = frozenset(loader.exclude)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        tf = self.transform
        reader = _ByteReader()
        try:
            for b in range(self.start + wid, self.n_batches, nw):
                yield self._make(b, tf, reader)
        finally:
            reader.close()

    def _make(self, b, tf, reader):
        from .prompts import PromptBuilder
        ids = list(self.order[b * self.bs:(b + 1) * self.bs])
        spare_rng = np.random.default_rng([self.seed, self.epoch, self.rank, b, 3])
        images, captions, used, bad = [], [], [], []
        # augmentation randomness is seeded per batch; fork_rng keeps the caller's global RNG intact
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix_seed(self.seed, self.epoch, self.rank, b))
            tries = 0
            while ids or len(images) < self.bs:
                if not ids:
                    tries += 1
                    if tries > 10 * self.bs:
                        raise RuntimeError(f"torch loader: could not fill batch {b}: too many bad samples "
                                           f"({len(bad)}), e.g. {bad[:3]}")
                    pool = self.spares if len(self.spares) else self.order
                    ids.append(int(pool[spare_rng.integers(len(pool))]))
                i = int(ids.pop(0))
                r = self.refs[i]
                if (r.shard, r.key) in self.exclude:
                    continue  # known bad (an earlier epoch): replaced without reading it again
                try:
                    cap = _caption(reader.read(r.shard, r.txt_off, r.txt_size))
                    if not cap:
                        bad.append((r.shard, r.key, "empty caption", "empty_caption"))
                        continue
                    img = decode_image(reader.read(r.shard, r.img_off, r.img_size))
                except Exception as e:
                    bad.append((r.shard, r.key, f"undecodable image: {type(e).__name__}: {e}",
                                "corrupt_image"))
                    continue
                images.append(tf(img))
                captions.append(cap)
                used.append(i)
        pb = PromptBuilder(self.k, context_length=self.context_length, templates=self.templates)
        texts = pb.batch(captions, [np.random.default_rng([self.seed, self.epoch, i]) for i in used])
        return b, torch.stack(images), texts, bad


class TorchTrainLoader(_TrainLoaderBase):
    """webdataset shards + PIL + torchvision, no DALI.  The epoch order is a seeded global
    permutation of all samples (rank r takes every world_size-th), read by random access through
    the index offsets, so resuming at batch k costs nothing and sees the same order."""

    backend = "torch"

    def _epoch_order(self) -> Tuple[np.ndarray, np.ndarray]:
        n = len(self.refs)
        perm = np.random.default_rng([self.seed, self.epoch, 101]).permutation(n)
        mine = perm[self.rank::self.world_size]
        need = self._len * self.batch_size
        if len(mine) < need:  # cfg.length larger than the data: wrap around (repeat=True stream)
            reps = math.ceil(need / max(1, len(mine)))
            mine = np.concatenate([np.random.default_rng([self.seed, self.epoch, 102, j]).permutation(mine)
                                   for j in range(reps)])
        return mine[:need], mine[need:]

    def __iter__(self):
        from .prompts import pos_tag
        from .transforms import pil_train_transform
        # build the transform (torchvision import, seconds) and load the tagger lexicon here, before
        # the workers fork, so each worker inherits them instead of paying for them again
        tf = pil_train_transform(self.cfg)
        pos_tag("a photo")
        order, spares = self._epoch_order()
        ds = _EpochBatches(self, order, spares, self.position, tf)
        nw = max(0, int(self.cfg.num_threads)) if self._len - self.position > 1 else 0
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=nw,
                                         pin_memory=self.device.type == "cuda",
                                         persistent_workers=False)
        for b, images, texts, bad in dl:
            for shard, key, reason, kind in bad:
                self.stats.add_bad(shard, key, reason, kind)
                self.exclude.add((shard, key))
            self.stats.good += images.shape[0]
            images = images.to(self.device, non_blocking=True)
            images = self._finish(images, b)
            self.position = b + 1
            yield images, texts.to(self.device)
        self.epoch, self.position = self.epoch + 1, 0


# ------------------------------------------------------------------------------------ DALI backend

def _dali_device(cfg: DataConfig, device: torch.device) -> str:
    if cfg.dali_device != "auto":
        return cfg.dali_device
    return "mixed" if (device.type == "cuda" and torch.cuda.is_available()) else "cpu"


def build_dali_pipeline(cfg: DataConfig, paths: Sequence[str], index_paths: Sequence[str], *,
                        batch_size: int, shard_id: int, num_shards: int, seed: int,
                        decode_device: str = "cpu", device_id: Optional[int] = None,
                        train: bool = True, num_threads: Optional[int] = None):
    """The DALI graph: webdataset reader -> decode (+random crop) -> flip/RandAugment -> normalise.

    Returns a built pipeline producing (images float CHW, caption bytes zero-padded, source info).
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    size = int(cfg.image_size)
    mean = [m * 255 for m in cfg.mean]
    std = [s * 255 for s in cfg.std]
    use_ra = train and cfg.randaugment

    @pipeline_def(enable_conditionals=use_ra)
    def graph():
        jpg, txt = fn.readers.webdataset(
            paths=list(paths), index_paths=list(index_paths), ext=["jpg;png;jpeg", "txt;text"],
            missing_component_behavior="skip", random_shuffle=train,
            initial_fill=max(1, min(cfg.shuffle_buffer, 100000)) if train else 1,
            shard_id=shard_id, num_shards=num_shards, pad_last_batch=not train, name="Reader")
        info = fn.get_property(jpg, key="source_info")
        if train:
            # decode only the crop window (nvJPEG/libjpeg ROI decode), then resize: timm's RRC
            def rrc(area):
                out = fn.decoders.image_random_crop(
                    jpg, device=decode_device, output_type=types.RGB,
                    random_area=list(area), random_aspect_ratio=list(cfg.crop_ratio),
                    num_attempts=10)
                # antialiased like PIL's bilinear resize in timm's RandomResizedCrop
                return fn.resize(out, size=[size, size], interp_type=types.INTERP_LINEAR,
                                 antialias=True)
            img = rrc(cfg.crop_scale)
            if cfg.zoom_p > 0:
                # both crops are decoded and one is kept per sample: a per-sample choice of
                # random_area without conditionals (uint8 x {0,1} sums are exact)
                zoom = fn.random.coin_flip(probability=cfg.zoom_p, dtype=types.UINT8)
                img = fn.cast(img * (1 - zoom) + rrc(cfg.zoom_crop_scale) * zoom,
                              dtype=types.UINT8)
            if use_ra:
                from nvidia.dali.auto_aug import rand_augment
                # 11 bins: m=9 is 9/10 of the maximal magnitude, timm's rand-m9 scale
                img = rand_augment.rand_augment(img, n=cfg.randaugment_n, m=cfg.randaugment_m,
                                                num_magnitude_bins=11, shape=[size, size],
                                                max_translate_rel=0.45, fill_value=124,
                                                interp_type=(types.INTERP_NN
                                                             if cfg.randaugment_interp == "nearest"
                                                             else types.INTERP_LINEAR))
            mirror = fn.random.coin_flip(probability=cfg.hflip) if cfg.hflip > 0 else 0
            img = fn.crop_mirror_normalize(img, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
                                           mean=mean, std=std)
        else:
            img = fn.decoders.image(jpg, device=decode_device, output_type=types.RGB)
            img = fn.resize(img, resize_shorter=int(round(size * cfg.eval_resize_ratio)),
                            interp_type=types.INTERP_LINEAR)
            img = fn.crop_mirror_normalize(img, crop=(size, size), dtype=types.FLOAT,
                                           output_layout="CHW", mean=mean, std=std)
        txt = fn.pad(txt, fill_value=0)
        return img, txt, info

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # DALI's own auto_aug aliases
        pipe = graph(batch_size=batch_size, num_threads=num_threads or max(1, cfg.num_threads),
                     device_id=device_id, seed=seed, prefetch_queue_depth=2)
        pipe.build()
    return pipe


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    """DALI TensorList (dense) -> torch tensor on ``device``."""
    t = tl.as_tensor()
    if hasattr(tl, "as_cpu") and type(tl).__name__.endswith("GPU"):
        from nvidia.dali.plugin.pytorch import feed_ndarray
        out = torch.empty(t.shape(), dtype=torch.float32, device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(t)).to(device)


class DaliTrainLoader(_TrainLoaderBase):
    """``fn.readers.webdataset`` split by rank, shuffled with a sample buffer, decoded on the CPU or
    with nvJPEG (``mixed``).  One pipeline per epoch (seeded by seed, epoch, rank); resuming in the
    middle of an epoch replays the epoch's first batches (decoded and dropped) to reach the same
    position, since DALI readers cannot seek."""

    backend = "dali"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.decode_device = _dali_device(self.cfg, self.device)
        self._fallback: Optional[TorchTrainLoader] = None
        self._idx_dir = os.path.join(_cache_root(self.cfg), "dali_idx")

    def _pipeline(self):
        paths, idxs = write_filtered_indices(self.refs, self._idx_dir)
        device_id = None
        if self.decode_device == "mixed":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return build_dali_pipeline(self.cfg, paths, idxs, batch_size=self.batch_size,
                                   shard_id=self.rank, num_shards=self.world_size,
                                   seed=_mix_seed(self.seed, self.epoch, self.rank, 5),
                                   decode_device=self.decode_device, device_id=device_id, train=True)

    def _rank_portion(self) -> List[SampleRef]:
        n = len(self.refs)
        lo = n * self.rank // self.world_size
        hi = n * (self.rank + 1) // self.world_size
        return self.refs[lo:hi]

    def _locate_bad_images(self, candidates: Sequence[SampleRef]) -> List[SampleRef]:
        reader = _ByteReader()
        bad = []
        try:
            for r in candidates:
                try:
                    why = validate_image_bytes(reader.read(r.shard, r.img_off, r.img_size))
                except OSError as e:
                    why = str(e)
                if why is not None:
                    self.stats.add_bad(r.shard, r.key, why, "corrupt_image")
                    bad.append(r)
        finally:
            reader.close()
        return bad

    def _recover(self, err: Exception) -> bool:
        """After a pipeline failure: find the bad images, drop them from the index. True if found."""
        self.stats.pipeline_restarts += 1
        warnings.warn(f"DALI pipeline failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                      f"locating corrupt images and rebuilding it")
        bad = self._locate_bad_images(self._rank_portion())
        if not bad:
            bad = self._locate_bad_images([r for r in self.refs if r not in set(self._rank_portion())])
        if not bad:
            return False
        self.exclude |= {(r.shard, r.key) for r in bad}
        self.refs = [r for r in self.refs if (r.shard, r.key) not in self.exclude]
        return True

    def _switch_to_torch(self, reason: str):
        warnings.warn(f"DALI loader falls back to the torch loader: {reason}")
        fb = TorchTrainLoader(self.cfg, rank=self.rank, world_size=self.world_size,
                              batch_size=self.batch_size, seed=self.seed, epoch=self.epoch,
                              device=self.device, refs=self.refs, stats=self.stats, exclude=self.exclude)
        fb.position = self.position
        fb._len = self._len
        self._fallback = fb
        self.backend = "dali->torch"

    def __iter__(self):
        if self._fallback is not None:
            self._fallback.epoch, self._fallback.position = self.epoch, self.position
            for out in self._fallback:
                self.position = self._fallback.position
                yield out
            self.epoch, self.position = self._fallback.epoch, 0
            return
        yield from self._iter_dali()

    def _iter_dali(self):
        start = self.position
        produced = 0  # batches produced by this epoch's pipeline (replayed ones included)
        pending_img: List[torch.Tensor] = []
        pending_cap: List[str] = []
        pending_id: List[int] = []
        self.refs = [r for r in self.refs if (r.shard, r.key) not in self.exclude]
        pipe = self._pipeline()
        sample_no = 0  # running sample number within the epoch, seeds the prompts
        restarts_here = 0
        while produced < self._len:
            try:
                img_tl, txt_tl, info_tl = pipe.run()
            except Exception as e:  # DALI raises RuntimeError on a decoder failure
                restarts_here += 1
                del pipe
                if restarts_here > 3 or not self._recover(e):
                    self._switch_to_torch(f"pipeline failure not attributable to an image: {e}")
                    self.position = max(self.position, produced)
                    yield from self.__iter__()
                    return
                # replay the epoch with the bad samples left out up to the delivered position
                pipe = self._pipeline()
                produced, sample_no = 0, 0
                pending_img, pending_cap, pending_id = [], [], []
                start = self.position
                continue
            n = len(txt_tl)
            txt = np.array(txt_tl.as_tensor()) if n else np.zeros((0, 0), np.uint8)
            keep, caps = [], []
            for i in range(n):
                cap = _caption(bytes(txt[i]).rstrip(b"\0"))
                if not cap:
                    where = bytes(np.array(info_tl.at(i))).decode("utf-8", "replace")
                    shard, _, key = where.rpartition(":")
                    shard, key = shard.rsplit(":", 1)[0], key.rsplit(".", 1)[0]
                    self.stats.add_bad(shard, key, "empty caption", "empty_caption")
                    self.exclude.add((shard, key))  # left out of the next epoch's index
                    continue
                keep.append(i)
                caps.append(cap)
            images = _to_torch(img_tl, self.device)
            if len(keep) < n:
                images = images[torch.as_tensor(keep, device=images.device)]
            pending_img.append(images)
            pending_cap.extend(caps)
            pending_id.extend(range(sample_no, sample_no + len(caps)))
            sample_no += n
            total = sum(x.shape[0] for x in pending_img)
            while total >= self.batch_size and produced < self._len:
                allimg = torch.cat(pending_img) if len(pending_img) > 1 else pending_img[0]
                bimg, rest = allimg[:self.batch_size], allimg[self.batch_size:]
                bcap, bid = pending_cap[:self.batch_size], pending_id[:self.batch_size]
                pending_img = [rest] if rest.shape[0] else []
                pending_cap, pending_id = pending_cap[self.batch_size:], pending_id[self.batch_size:]
                total -= self.batch_size
                b = produced
                produced += 1
                if b < start:
                    continue
                texts = self._texts(bcap, [self.rank * 10 ** 9 + i for i in bid])
                self.stats.good += bimg.shape[0]
                bimg = self._finish(bimg, b)
                self.position = b + 1
                yield bimg, texts.to(self.device)
        del pipe
        self.epoch, self.position = self.epoch + 1, 0


# ------------------------------------------------------------------------------------ builders

def build_train_loader(cfg: Optional[DataConfig] = None, *, rank: int = 0, world_size: int = 1,
                       batch_size: int = 256, seed: int = 0, epoch: int = 0, device="cpu"):
    """The training loader of the data contract (see module doc); backend from ``cfg.loader``."""
    cfg = cfg or DataConfig()
    shards = _resolve_shards(cfg)
    stats = DataStats()
    refs = index_shards(shards, stats)
    if cfg.validate_images:
        reader = _ByteReader()
        good = []
        for r in refs:
            why = validate_image_bytes(reader.read(r.shard, r.img_off, r.img_size))
            if why is None:
                good.append(r)
            else:
                stats.add_bad(r.shard, r.key, why, "corrupt_image")
        reader.close()
        refs = good
    if stats.n_skipped:
        warnings.warn(f"data: {stats.n_skipped} bad samples skipped while indexing "
                      f"({stats.summary()}); first: {stats.bad[0] if stats.bad else ''}")
    if not refs:
        raise ValueError(f"no usable samples in {len(shards)} shard(s) ({stats.summary()}); "
                         f"first shard: {shards[0]}")
    backend = cfg.loader
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
    if backend == "dali" and not dali_available():
        raise ImportError("DataConfig.loader='dali' but nvidia-dali is not importable "
                          "(pip install nvidia-dali-cuda120, or use loader='torch')")
    cls = DaliTrainLoader if backend == "dali" else TorchTrainLoader
    return cls(cfg, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed, epoch=epoch,
               device=device, refs=refs, stats=stats)


class EvalLoader:
    """One deterministic pass (no augmentation, eval transform) yielding (images, caption tokens
    [B, 77]); the last batch may be smaller.  Uses the torch path: evaluation sets are small."""

    def __init__(self, cfg: DataConfig, shards, batch_size: int, device="cpu"):
        self.cfg = cfg
        self.stats = DataStats()
        self.refs = index_shards(expand_shards(shards), self.stats)
        self.batch_size = batch_size
        self.device = torch.device(device)

    def __len__(self):
        return math.ceil(len(self.refs) / self.batch_size)

    def __iter__(self):
        from .tokenizer import tokenize
        from .transforms import pil_eval_transform
        tf = pil_eval_transform(self.cfg)
        reader = _ByteReader()
        imgs, caps = [], []
        try:
            for r in self.refs:
                try:
                    cap = _caption(reader.read(r.shard, r.txt_off, r.txt_size))
                    img = decode_image(reader.read(r.shard, r.img_off, r.img_size))
                except Exception as e:
                    self.stats.add_bad(r.shard, r.key, f"{type(e).__name__}: {e}", "corrupt_image")
                    continue
                imgs.append(tf(img))
                caps.append(cap)
                self.stats.good += 1
                if len(imgs) == self.batch_size:
                    yield torch.stack(imgs).to(self.device), tokenize(caps, self.cfg.context_length).to(self.device)
                    imgs, caps = [], []
            if imgs:
                yield torch.stack(imgs).to(self.device), tokenize(caps, self.cfg.context_length).to(self.device)
        finally:
            reader.close()


def build_eval_loader(cfg: Optional[DataConfig] = None, shards=None, *, batch_size: int = 64,
                      device="cpu") -> EvalLoader:
    cfg = cfg or DataConfig()
    if shards is None:
        from .synthetic import ensure_shards
        shards = ensure_shards(cfg.synthetic, cfg.cache_dir, splits=("val",))["val"]
    return EvalLoader(cfg, shards, batch_size, device)
