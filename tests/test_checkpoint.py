"""Checkpoint reading (safely, without weights_only=False), loading with config inference,
one-message errors, pos_embed resizing and atomic saves. Small models only (fast on CPU)."""
import dataclasses
import os
import sys
import textwrap
import uuid

import pytest
import torch
import torch.nn.functional as F

from groupvit_fast import GroupViT, ModelConfig, TextTransformer, build_model
from groupvit_fast.checkpoint import (CheckpointError, PickledObjectPlaceholder, atomic_save,
                                      checkpoint_config, infer_model_config, load_checkpoint,
                                      load_state_dict_any, placeholder_to_python, read_checkpoint,
                                      save_checkpoint)
from groupvit_fast.config import ImageEncoderConfig, TextEncoderConfig
from groupvit_fast.convert import official_to_hf


def small_cfg(img_size=32, multi_label=0, heads=(2, 2, 2)):
    return ModelConfig(img=ImageEncoderConfig(img_size=img_size, patch_size=8, embed_dim=64,
                                              depths=[2, 1, 1], num_heads=list(heads),
                                              num_group_tokens=[8, 4, 0], num_output_groups=[8, 4],
                                              drop_path_rate=0.0),
                       text=TextEncoderConfig(context_length=16, width=64, layers=2,
                                              vocab_size=500),
                       output_dim=32, multi_label=multi_label)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return build_model(small_cfg(multi_label=2))


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def weights_only_spy(monkeypatch):
    """Records the weights_only argument of every torch.load call."""
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


# -- our own saves ----------------------------------------------------------------------------
def test_save_and_load_round_trip(small, tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint(small, path, epoch=7, config=small_cfg(multi_label=2))
    obj = torch.load(path, weights_only=True)  # plain data only: dataclass stored as dict
    assert set(obj) == {"model", "epoch", "config"} and obj["epoch"] == 7
    assert list(obj["model"]) == list(small.state_dict())
    m = load_checkpoint(path)
    assert same_weights(m, small)
    assert not m.training and m.multi_label == 2
    assert [l.blocks[0].attn.num_heads for l in m.img_encoder.layers] == [2, 2, 2]
    assert not [p for p in os.listdir(tmp_path) if p != "ckpt.pth"]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_save_unwraps_wrappers(small, tmp_path):
    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    save_checkpoint(Wrapper(small), tmp_path / "w.pth")
    assert list(torch.load(tmp_path / "w.pth", weights_only=True)["model"]) == list(
        small.state_dict())
    # a DDP-style "module." prefix in a foreign file is stripped on load
    torch.save({"state_dict": {"module." + k: v for k, v in small.state_dict().items()}},
               tmp_path / "ddp.pth")
    assert same_weights(load_checkpoint(tmp_path / "ddp.pth"), small)


def test_atomic_save_keeps_old_file_on_failure(small, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint(small, path, epoch=1)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(small, path, epoch=2)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def test_safetensors_save_and_load(small, tmp_path):
    pytest.importorskip("safetensors")
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(small, path, epoch=4)
    obj = read_checkpoint(path)
    assert obj["epoch"] == 4 and list(obj["model"]) == list(small.state_dict())
    assert same_weights(load_checkpoint(path), small)


# -- official files with pickled non-torch objects ------------------------------------------------
def _fake_omegaconf_module(tmp_path):
    """A module that exists only while the checkpoint is written, as omegaconf does not exist
    where the checkpoint is read. Its classes mimic OmegaConf's pickled state (_content/_val)."""
    name = f"fake_omegaconf_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        class Metadata:
            def __init__(self, ref_type=None):
                self.ref_type = ref_type
        class AnyNode:
            def __init__(self, val):
                self._val, self._metadata, self._parent = val, Metadata(object), None
        class DictConfig:
            def __init__(self, d):
                self._metadata, self._parent = Metadata(dict), None
                self._content = {k: DictConfig(v) if isinstance(v, dict) else
                                 ListConfig(v) if isinstance(v, list) else AnyNode(v)
                                 for k, v in d.items()}
        class ListConfig:
            def __init__(self, l):
                self._metadata, self._parent = Metadata(list), None
                self._content = [AnyNode(v) for v in l]
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        mod = __import__(name)
    finally:
        sys.path.remove(str(tmp_path))
    return name, mod


def test_official_pth_with_pickled_config_loads_without_unsafe_load(small, tmp_path,
                                                                    weights_only_spy):
    name, mod = _fake_omegaconf_module(tmp_path)
    # the official config: heads are not in the shapes, multi_label is an interpolation
    cfg = mod.DictConfig({
        "data": {"text_aug": {"multi_label": 2}},
        "model": {"type": "MultiLabelContrastive",
                  "img_encoder": {"type": "GroupViT", "img_size": 32, "patch_size": 8,
                                  "embed_dim": 64, "num_heads": [4, 4, 4], "depths": [2, 1, 1]},
                  "text_encoder": {"type": "TextTransformer", "width": 64},
                  "multi_label": "${data.text_aug.multi_label}", "output_dim": 32}})
    path = tmp_path / "group_vit_official.pth"
    obj = {"model": small.state_dict(), "config": cfg, "epoch": 29,
           "metrics": {"max_accuracy": 1.0}}
    torch.save(obj, path)
    # the pre-1.6 (non-zip) format too: unknown names are then learnt from the refusals
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": {"w": torch.ones(3)}, "config": cfg}, legacy,
               _use_new_zipfile_serialization=False)
    del sys.modules[name]
    os.remove(tmp_path / f"{name}.py")
    with pytest.raises(Exception):  # the simulation is real: torch's safe load refuses it
        torch.load(path, weights_only=True)
    weights_only_spy.clear()

    obj = read_checkpoint(path)
    assert weights_only_spy and all(w is True for w in weights_only_spy)
    assert isinstance(obj["config"], PickledObjectPlaceholder)
    assert obj["config"].pickled_name == f"{name}.DictConfig"
    assert obj["epoch"] == 29 and obj["metrics"] == {"max_accuracy": 1.0}
    plain = placeholder_to_python(obj["config"])
    assert plain["model"]["img_encoder"]["num_heads"] == [4, 4, 4]
    assert checkpoint_config(obj)["multi_label"] == 2  # interpolation resolved

    old = read_checkpoint(legacy)
    assert torch.equal(old["model"]["w"], torch.ones(3))
    assert checkpoint_config(old)["img_encoder"]["num_heads"] == [4, 4, 4]

    weights_only_spy.clear()
    m = load_checkpoint(path)
    assert all(w is True for w in weights_only_spy)
    assert same_weights(m, small)
    # heads came from the pickled config (shapes alone would give 64 // 64 = 1)
    assert [l.blocks[0].attn.num_heads for l in m.img_encoder.layers] == [4, 4, 4]
    assert m.multi_label == 2


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Exec:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    class Subprocess:
        def __reduce__(self):
            import subprocess
            return (subprocess.call, (["touch", str(marker)],))

    for payload in (Exec(), Subprocess()):
        path = tmp_path / "evil.pth"
        torch.save({"model": {"w": torch.ones(2)}, "config": payload}, path)
        obj = read_checkpoint(path)
        assert not marker.exists()
        assert isinstance(obj["config"], PickledObjectPlaceholder)  # the call was only recorded
        assert torch.equal(obj["model"]["w"], torch.ones(2))

    class System:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {"w": torch.ones(2)}, "config": System()}, tmp_path / "evil2.pth")
    with pytest.raises(CheckpointError,
                       match=r"evil2\.pth: refusing to read: .*system.*'(posix|os|nt)'"):
        read_checkpoint(tmp_path / "evil2.pth")
    assert not marker.exists()


def test_unreadable_files_give_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth: no such checkpoint file"):
        read_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"junk\.pth: not a readable torch checkpoint"):
        read_checkpoint(tmp_path / "junk.pth")
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "noweights.pth")
    with pytest.raises(CheckpointError, match=r"noweights\.pth: no model state dict found"):
        load_checkpoint(tmp_path / "noweights.pth")


# -- mismatches: one message with everything ---------------------------------------------
def test_missing_unexpected_and_shape_errors(small, tmp_path):
    target = build_model(small_cfg(multi_label=2))
    sd = dict(small.state_dict())

    def err(sd_, **kw):
        path = tmp_path / "bad.pth"
        torch.save({"model": sd_}, path)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path, target, **kw)
        msg = str(e.value)
        assert msg.startswith(f"{path}: checkpoint does not fit MultiLabelContrastive")
        return msg

    missing = {k: v for k, v in sd.items() if k != "img_encoder.norm.weight"}
    msg = err(missing)
    assert "missing keys (1): img_encoder.norm.weight" in msg and "unexpected keys" not in msg

    msg = err({**sd, "img_encoder.extra.weight": torch.zeros(3)})
    assert "unexpected keys (1): img_encoder.extra.weight" in msg and "missing keys" not in msg

    wrong = {**sd, "text_encoder.ln_final.weight": torch.zeros(65)}
    msg = err(wrong)
    assert "shape mismatches (1): text_encoder.ln_final.weight: expected [64], found [65]" in msg

    all3 = {k: v for k, v in wrong.items() if k != "img_encoder.norm.weight"}
    all3["foo"] = torch.zeros(1)
    msg = err(all3)
    assert "missing keys (1)" in msg and "unexpected keys (1): foo" in msg \
        and "shape mismatches (1)" in msg
    # shapes are checked even when strict=False (they cannot be loaded); keys are not
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(wrong, target, strict=False)
    before = target.img_encoder.norm.weight.clone()
    load_checkpoint(missing, target, strict=False)
    assert torch.equal(target.img_encoder.norm.weight, before)
    assert torch.equal(target.text_encoder.ln_final.weight, sd["text_encoder.ln_final.weight"])

    # multi_label mismatch gets a hint
    msg = err({k: v for k, v in sd.items() if k != "multi_label_logit_scale"})
    assert "multi_label_logit_scale" in msg and "RedCaps" in msg


def test_pos_embed_of_another_grid_is_resized(small, tmp_path):
    big = build_model(small_cfg(img_size=48, multi_label=2))  # 6x6 grid vs the 4x4 of `small`
    load_checkpoint(small.state_dict(), big)
    src = small.img_encoder.pos_embed.detach()
    # [1,16,C] -> [1,C,4,4] -> bicubic 6x6 -> [1,36,C]
    ref = F.interpolate(src.reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(6, 6),
                        mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, -1)
    assert torch.allclose(big.img_encoder.pos_embed, ref, atol=1e-6)
    assert torch.equal(big.img_encoder.norm.weight, small.img_encoder.norm.weight)
    # building from a checkpoint infers img_size from the grid and the patch
    assert load_checkpoint(big.state_dict()).img_encoder.patch_embed.img_size[0] == 48


def test_hf_state_dicts_load(small, tmp_path):
    hf = official_to_hf(small.state_dict(), position_ids=True)
    for name in ("hf.bin", "hf.safetensors"):
        path = tmp_path / name
        atomic_save(hf, path)
        target = build_model(small_cfg(multi_label=2))
        init_ml = target.multi_label_logit_scale.clone()
        with pytest.warns(UserWarning, match="no multi_label_logit_scale"):
            load_checkpoint(path, target)
        sd, ref = target.state_dict(), small.state_dict()
        assert all(torch.equal(sd[k], ref[k]) for k in ref if k != "multi_label_logit_scale")
        assert torch.equal(target.multi_label_logit_scale, init_ml)
        built = load_checkpoint(path)
        assert built.multi_label == 0  # nothing in a HF file says otherwise
        assert all(torch.equal(built.state_dict()[k], ref[k]) for k in built.state_dict())
    assert list(load_state_dict_any(tmp_path / "hf.bin")) == [
        k for k in small.state_dict() if k != "multi_label_logit_scale"]


def test_hf_model_directory(small, tmp_path):
    d = tmp_path / "hf_model"
    d.mkdir()
    atomic_save(official_to_hf(small.state_dict()), d / "model.safetensors")
    (d / "config.json").write_text('{"vision_config": {"num_attention_heads": 4, '
                                   '"depths": [2, 1, 1]}}')
    m = load_checkpoint(d)
    assert [l.blocks[0].attn.num_heads for l in m.img_encoder.layers] == [4, 4, 4]


def test_full_checkpoint_into_bare_encoders(small):
    cfg = small_cfg()
    img = GroupViT(**dataclasses.asdict(cfg.img))
    load_checkpoint(small.state_dict(), img)
    assert same_weights(img, small.img_encoder)
    txt = TextTransformer(**dataclasses.asdict(cfg.text))
    load_checkpoint({"model": small.state_dict()}, txt)
    assert same_weights(txt, small.text_encoder)


def test_infer_config_variants():
    for cfg in (small_cfg(), small_cfg(img_size=64, multi_label=3, heads=(1, 1, 1))):
        torch.manual_seed(0)
        m = build_model(cfg)
        got = infer_model_config(m.state_dict(), base=None)
        assert got.img.img_size == cfg.img.img_size and got.img.depths == cfg.img.depths
        assert got.img.num_group_tokens == [8, 4, 0] and got.img.num_output_groups == [8, 4]
        assert got.img.embed_dim == 64 and got.img.patch_size == 8
        assert got.img.num_heads == [1, 1, 1]  # head_dim 64 unless the config says otherwise
        assert dataclasses.asdict(got.text) == dataclasses.asdict(cfg.text)
        assert got.output_dim == 32 and got.proj_num_layers == 2
        assert got.multi_label == (3 if cfg.multi_label else 0)
    # head_dim 64 without a config: 192 wide -> 3 heads (not the release's 6, head_dim 32)
    cfg = small_cfg()
    cfg = dataclasses.replace(cfg, img=dataclasses.replace(cfg.img, embed_dim=192,
                                                           num_heads=[3, 3, 3]))
    sd = build_model(cfg).state_dict()
    assert infer_model_config(sd).img.num_heads == [3, 3, 3]
    assert infer_model_config(sd, base=small_cfg(heads=(6, 6, 6))).img.num_heads == [6, 6, 6]
    with pytest.raises(CheckpointError, match="cannot infer the model config: missing"):
        infer_model_config({"logit_scale": torch.zeros(())})


def test_empty_last_stage_survives_the_round_trip():
    """A last stage with no blocks and no group tokens (depths [.., 0]) holds no parameter, so
    the keys cannot show it: the config saved with the weights keeps it, and the reloaded model
    has every stage and the same outputs (a per-stage option such as assign_scale then still
    has one value per grouping block)."""
    cfg = small_cfg()
    cfg = dataclasses.replace(cfg, img=dataclasses.replace(cfg.img, depths=[2, 1, 0],
                                                           assign_scale=[1.0, 8.0]))
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    assert infer_model_config(m.state_dict(), base=None).img.depths == [2, 1]  # keys alone
    got = infer_model_config(m.state_dict(), base=cfg)
    assert got.img.depths == [2, 1, 0] and got.img.num_output_groups == [8, 4]
    back = load_checkpoint({"model": m.state_dict(),
                            "config": {"model": dataclasses.asdict(cfg)}}).eval()
    assert len(back.img_encoder.layers) == 3
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(back.encode_image(x), m.encode_image(x))


def test_build_without_init_when_the_model_code_allows_it(small, monkeypatch):
    """Models built from a checkpoint skip the (slow) random init by building on the meta device
    and assigning the checkpoint tensors; falls back to a regular build when that fails."""
    import groupvit_fast.checkpoint as ck
    real_linspace = torch.linspace

    def cpu_linspace(*a, **k):  # GroupViT reads drop-path rates with .item(); keep them on CPU
        k["device"] = "cpu"
        return real_linspace(*a, **k)

    monkeypatch.setattr(torch, "linspace", cpu_linspace)
    assert ck._build_on_meta(small_cfg()) is not None
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in small.state_dict().items()}
    m = load_checkpoint(sd)
    ref = small.state_dict()
    for k, v in m.state_dict().items():
        assert not v.is_meta and v.dtype == ref[k].dtype
        assert torch.equal(v, ref[k].half().to(ref[k].dtype) if v.is_floating_point() else ref[k])
    assert not m.img_encoder.pos_embed.is_meta and m.img_encoder.pos_embed.requires_grad
    with torch.no_grad():  # no aliasing with the caller's tensors
        m.logit_scale.add_(1.0)
    assert not torch.equal(m.logit_scale.half(), sd["logit_scale"])
    out = m.encode_image(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 32) and torch.isfinite(out).all()


def test_saved_config_restores_options_the_weights_cannot_tell(tmp_path):
    # assign_scale and heads are not in any tensor shape: they come back from the stored config,
    # and the loaded model carries that config (the emergence report builds its random-init
    # twin from it)
    cfg = small_cfg(heads=(2, 2, 2))
    cfg.img.assign_scale = [1.0, 4.0]
    m = build_model(cfg)
    path = save_checkpoint(m, tmp_path / "m.pth", config={"model": dataclasses.asdict(cfg)})
    got = load_checkpoint(path)
    assert [l.downsample.assign.scale for l in got.img_encoder.layers[:2]] == [1.0, 4.0]
    assert got.model_config.img.assign_scale == [1.0, 4.0]
    assert got.model_config.img.num_heads == [2, 2, 2]
    twin = build_model(got.model_config)
    assert [l.downsample.assign.scale for l in twin.img_encoder.layers[:2]] == [1.0, 4.0]
