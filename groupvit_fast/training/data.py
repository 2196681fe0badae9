"""Training data for the engine: the in-memory 'random' dataset (image/caption pairs drawn from
a seeded generator; no files, used by tests and smoke runs) and the adapter to
``groupvit_fast.data.build_train_loader`` for every other dataset.

Every loader follows the data contract: iterable of (images [B,3,H,W] float, texts int64
[B,1+K,77] or [B,77]), ``len()`` = batches per epoch per rank, ``state_dict()`` /
``load_state_dict()`` = position in the stream (resume continues with the same order), ``stats``."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch

SOT, EOT = 49406, 49407


class RandomPairs:
    """``length`` fixed image/text pairs from ``torch.Generator(seed)``. Captions are random BPE
    ids between SOT and EOT with random lengths (so EOT pooling and truncation are exercised);
    with K > 0 every sample carries 1 + K token rows."""

    def __init__(self, length: int, img_size: int, multi_label: int = 0, seed: int = 0,
                 context_length: int = 77, vocab_size: int = 49408, max_words: int = 12):
        if length < 1:
            raise ValueError(f"RandomPairs: length must be >= 1, got {length}")
        g = torch.Generator().manual_seed(int(seed) + 7919)
        self.images = torch.randn(length, 3, img_size, img_size, generator=g)  # [N,3,H,W]
        rows = 1 + multi_label
        n_words = torch.randint(1, max_words + 1, (length, rows), generator=g)  # [N,rows]
        words = torch.randint(1, min(vocab_size, SOT), (length, rows, context_length),
                              generator=g)
        pos = torch.arange(context_length)[None, None]  # [1,1,L]
        texts = torch.where(pos <= n_words[..., None], words, 0)
        texts[..., 0] = SOT
        texts.scatter_(2, (n_words + 1).clamp(max=context_length - 1)[..., None], EOT)
        self.texts = texts if multi_label > 0 else texts[:, 0]  # [N,1+K,L] or [N,L]

    def __len__(self):
        return self.images.shape[0]


class RandomLoader:
    """Per-epoch permutation of a ``RandomPairs`` set (seed, epoch), split evenly over ranks;
    drops the remainder like the official ``with_epoch`` (partial=False)."""

    def __init__(self, pairs: RandomPairs, *, rank: int, world_size: int, batch_size: int,
                 seed: int, epoch: int = 0, device="cpu"):
        self.pairs, self.rank, self.world_size = pairs, rank, world_size
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.epoch, self.position = epoch, 0
        self.stats = {"skipped": 0}
        if len(self) == 0:
            raise ValueError(f"random dataset: {len(pairs)} samples cannot fill one batch of "
                             f"{batch_size} on each of {world_size} ranks; raise data.length")

    def __len__(self):
        return len(self.pairs) // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int):
        self.epoch, self.position = epoch, 0

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        perm = torch.randperm(len(self.pairs), generator=g)
        n = len(self)
        mine = perm[: n * self.batch_size * self.world_size].view(n, self.world_size,
                                                                  self.batch_size)[:, self.rank]
        while self.position < n:
            idx = mine[self.position]  # [B]
            self.position += 1
            yield (self.pairs.images[idx].to(self.device, non_blocking=True),
                   self.pairs.texts[idx].to(self.device, non_blocking=True))


def build_loader(cfg, *, rank: int, world_size: int, batch_size: int, seed: int, epoch: int = 0,
                 device="cpu"):
    """The training loader for ``cfg`` (a TrainConfig)."""
    d = cfg.data
    if d.dataset == "random":
        pairs = RandomPairs(d.length or 512, d.img_size, cfg.model.multi_label, seed=seed,
                            context_length=cfg.model.text.context_length,
                            vocab_size=cfg.model.text.vocab_size, **d.options)
        return RandomLoader(pairs, rank=rank, world_size=world_size, batch_size=batch_size,
                            seed=seed, epoch=epoch, device=device)
    try:
        from groupvit_fast.data import build_train_loader
    except ImportError as e:
        raise RuntimeError(f"data.dataset={d.dataset!r} needs groupvit_fast.data."
                           f"build_train_loader, which is not importable ({e}); use "
                           f"data.dataset=random for a file-free run") from None
    return build_train_loader(make_data_config(cfg), rank=rank, world_size=world_size,
                              batch_size=batch_size, seed=seed, epoch=epoch, device=device)


def make_data_config(cfg):
    """groupvit_fast.data.DataConfig from our data section. ``data.dataset='synthetic'`` uses the
    data package's recipe for the embedded scenes (``DataConfig.synthetic_recipe``); any other
    name needs webdataset shards in ``data.options.shards``. Image size, loader backend and
    length carry over; K prompts and the context length follow the model; ``data.options`` is
    passed on as DataConfig keyword arguments (checked against its fields)."""
    from groupvit_fast.data import DataConfig
    d = cfg.data
    names = {f.name for f in dataclasses.fields(DataConfig)} if dataclasses.is_dataclass(
        DataConfig) else set(inspect.signature(DataConfig).parameters)
    unknown = sorted(set(d.options) - names)
    if unknown:
        raise ValueError(f"data.options has field(s) {unknown} that groupvit_fast.data.DataConfig "
                         f"does not know; valid: {sorted(names)}")
    kw = dict(loader=d.loader, image_size=d.img_size, multi_label=cfg.model.multi_label,
              context_length=cfg.model.text.context_length)
    if d.length is not None:
        kw["length"] = d.length
    kw = {k: v for k, v in kw.items() if k in names}
    kw.update(d.options)
    if d.dataset == "synthetic":
        if kw.get("shards"):
            raise ValueError("data.dataset=synthetic takes no data.options.shards (the embedded "
                             "set writes its own); use another dataset name for your shards")
        return DataConfig.synthetic_recipe(**kw)
    if not kw.get("shards"):
        raise ValueError(f"data.dataset={d.dataset!r} needs webdataset shards: set "
                         f"data.options.shards (a list of files, globs or brace patterns such as "
                         f"'local_data/gcc3m_shards/gcc-train-{{000000..000436}}.tar')")
    return DataConfig(**kw)


def loader_len(loader) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:
        return None
