"""Numerical parity with Hugging Face transformers' GroupViTModel on converted random weights
(interop_hf §8): eval mode, fp32, identical inputs, 224² for the release config.

Compared: L2-normalised image and text embeddings, logits_per_image (HF has no clamp at 100, so
logit_scale stays below ln 100), the per-stage soft assignment maps and the composed soft grouping
maps (HF returns soft attentions), the final group tokens and their projections.
Both directions are exercised: ours -> HF (official_to_hf) and HF -> ours (load_checkpoint of a
HF state dict, which converts and infers the config)."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import GroupViTConfig, GroupViTModel  # noqa: E402

from groupvit_fast import ModelConfig, build_model  # noqa: E402
from groupvit_fast.checkpoint import load_checkpoint  # noqa: E402
from groupvit_fast.config import ImageEncoderConfig, TextEncoderConfig  # noqa: E402
from groupvit_fast.convert import official_to_hf  # noqa: E402

ATOL = 1e-4


def perturb(model, seed):
    """Random weights that exercise every parameter: the official init leaves biases and
    LayerNorms at 0/1, stage-2 group tokens at 0 and BN statistics at 0/1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 or "group_token" in name:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        for proj in (model.img_projector, model.text_projector):
            bn = proj.linear_hidden[1]
            bn.running_mean.copy_(0.1 * torch.randn(bn.running_mean.shape, generator=g))
            bn.running_var.copy_(0.5 + 1.5 * torch.rand(bn.running_var.shape, generator=g))
        model.logit_scale.fill_(math.log(30.0))  # below ln 100: HF does not clamp
    return model.eval()


def tokens(batch, vocab, context, seed):
    """SOT, random BPE ids, EOT (the largest id, so official argmax pooling and HF's first-EOS
    pooling pick the same position), zero padding as the official tokenizer."""
    g = torch.Generator().manual_seed(seed)
    sot, eot = vocab - 2, vocab - 1
    t = torch.zeros(batch, context, dtype=torch.long)
    for i in range(batch):
        n = 3 + 4 * i
        t[i, 0] = sot
        t[i, 1:1 + n] = torch.randint(1, sot, (n,), generator=g)
        t[i, 1 + n] = eot
    return t


def ours_outputs(model, image, text):
    with torch.no_grad():
        enc = model.img_encoder(image, return_feat=True, return_attn=True, as_dict=True)
        image_x = model.img_projector(enc["x"])
        group_x = model.img_projector(enc["feat"])  # [B,G,D]
        text_x = model.encode_text(text)
    ie, te = F.normalize(image_x, dim=-1), F.normalize(text_x, dim=-1)
    soft = [d["soft"][:, 0] for d in enc["attn_dicts"] if d is not None]  # [B,S,N] per stage
    # composed soft grouping: [B,N,S1] @ [B,S1,S2] -> [B,N,S2]
    comp = soft[0].transpose(1, 2)
    for s in soft[1:]:
        comp = comp @ s.transpose(1, 2)
    gh, gw = model.img_encoder.patches_resolution
    B, _, G = comp.shape
    grid = comp.transpose(1, 2).reshape(B, G, gh, gw)  # [B,G,N] -> [B,G,h,w]
    grouping = F.interpolate(grid, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return dict(image_embeds=ie, text_embeds=te,
                logits_per_image=ie @ te.t() * model.get_logit_scale(),
                soft=soft, grouping=grouping, feat=enc["feat"],
                group_embeds=F.normalize(group_x, dim=-1))


def hf_outputs(hf, image, text):
    from transformers.models.groupvit.modeling_groupvit import get_grouping_from_attentions
    with torch.no_grad():
        out = hf(input_ids=text, pixel_values=image, output_attentions=True)
        vis = out.vision_model_output
        att = list(vis.attentions)
        grouping = get_grouping_from_attentions(att, image.shape[-2:])
        B, G, C = vis.last_hidden_state.shape
        group_x = hf.visual_projection(vis.last_hidden_state.reshape(-1, C)).reshape(B, G, -1)
    return dict(image_embeds=out.image_embeds, text_embeds=out.text_embeds,
                logits_per_image=out.logits_per_image, soft=att, grouping=grouping,
                feat=vis.last_hidden_state, group_embeds=F.normalize(group_x, dim=-1))


def max_diffs(a, b):
    d = {}
    for k in a:
        if k == "soft":
            assert len(a[k]) == len(b[k])
            for i, (x, y) in enumerate(zip(a[k], b[k])):
                assert x.shape == y.shape, (k, i, x.shape, y.shape)
                d[f"soft{i}"] = (x - y).abs().max().item()
        else:
            assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
            d[k] = (a[k] - b[k]).abs().max().item()
    return d


def check(a, b, label):
    d = max_diffs(a, b)
    print(f"\n[hf parity] {label}: " + ", ".join(f"{k}={v:.2e}" for k, v in d.items()))
    bad = {k: v for k, v in d.items() if not v <= ATOL}
    assert not bad, f"{label}: max abs diff above {ATOL}: {bad}"
    # the comparison is not vacuous: embeddings differ between the two samples
    assert (a["image_embeds"][0] - a["image_embeds"][1]).abs().max() > 1e-3
    assert (a["text_embeds"][0] - a["text_embeds"][1]).abs().max() > 1e-3


# -- small config: quick, runs every variant -------------------------------------------------
def small_cfg(multi_label):
    return ModelConfig(img=ImageEncoderConfig(img_size=32, patch_size=8, embed_dim=64,
                                              depths=[2, 1, 1], num_heads=[2, 2, 2],
                                              num_group_tokens=[8, 4, 0], num_output_groups=[8, 4],
                                              drop_path_rate=0.0),
                       text=TextEncoderConfig(context_length=16, width=64, layers=2,
                                              vocab_size=500),
                       output_dim=32, multi_label=multi_label)


def small_hf_config():
    return GroupViTConfig(
        text_config=dict(vocab_size=500, hidden_size=64, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=16,
                         bos_token_id=498, eos_token_id=499),
        vision_config=dict(hidden_size=64, intermediate_size=256, depths=[2, 1, 1],
                           num_hidden_layers=4, num_group_tokens=[8, 4, 0],
                           num_output_groups=[8, 4, 4], num_attention_heads=2, image_size=32,
                           patch_size=8),
        projection_dim=32, projection_intermediate_dim=4096)


@pytest.mark.parametrize("multi_label", [0, 2])
def test_small_config_parity_ours_to_hf(multi_label):
    torch.manual_seed(0)
    ours = perturb(build_model(small_cfg(multi_label)), seed=1)
    hf = GroupViTModel(small_hf_config()).eval()
    hf.load_state_dict(official_to_hf(ours.state_dict()), strict=True)
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    text = tokens(2, 500, 16, seed=3)
    check(ours_outputs(ours, image, text), hf_outputs(hf, image, text),
          f"small, multi_label={multi_label}, ours->HF")


def test_small_config_parity_hf_to_ours():
    torch.manual_seed(0)
    hf = GroupViTModel(small_hf_config()).eval()  # HF's own init this time
    with torch.no_grad():
        hf.logit_scale.fill_(math.log(20.0))
    # heads are not in the tensor shapes: the HF config's 2 vision heads must be passed on
    cfg = small_cfg(0)
    ours = load_checkpoint(hf.state_dict(), config=cfg)
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    text = tokens(2, 500, 16, seed=5)
    check(ours_outputs(ours, image, text), hf_outputs(hf, image, text), "small, HF->ours")


def test_logit_scale_clamp_is_the_documented_difference():
    torch.manual_seed(0)
    ours = perturb(build_model(small_cfg(0)), seed=6)
    with torch.no_grad():
        ours.logit_scale.fill_(math.log(200.0))
    hf = GroupViTModel(small_hf_config()).eval()
    hf.load_state_dict(official_to_hf(ours.state_dict()), strict=True)
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    text = tokens(2, 500, 16, seed=8)
    a, b = ours_outputs(ours, image, text), hf_outputs(hf, image, text)
    # official: min(exp(s), 100); HF: exp(s) unclamped -> exactly a factor 2 here
    torch.testing.assert_close(a["logits_per_image"] * 2, b["logits_per_image"],
                               atol=2 * ATOL, rtol=0)


# -- the release configuration at 224² -----------------------------------------------------------
@pytest.fixture(scope="module")
def release_pair():
    torch.manual_seed(0)
    ours = perturb(build_model(ModelConfig(multi_label=3)), seed=11)
    hf = GroupViTModel(GroupViTConfig()).eval()
    converted = official_to_hf(ours.state_dict())
    assert "multi_label_logit_scale" not in converted
    hf.load_state_dict(converted, strict=True)
    image = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(12))
    text = tokens(2, 49408, 77, seed=13)
    return ours, hf, image, text, hf_outputs(hf, image, text)


def test_release_parity_multi_label_3(release_pair):
    ours, hf, image, text, ref = release_pair
    assert ours.multi_label == 3
    out = ours_outputs(ours, image, text)
    assert out["soft"][0].shape == (2, 64, 196) and out["soft"][1].shape == (2, 8, 64)
    assert out["grouping"].shape == (2, 8, 224, 224)
    check(out, ref, "release 224², multi_label=3, ours->HF")


def test_release_parity_multi_label_0_from_hf_state_dict(release_pair):
    _, hf, image, text, ref = release_pair
    # HF -> ours: conversion + config inference (no multi_label_logit_scale -> multi_label=0)
    ours = load_checkpoint(hf.state_dict())
    assert ours.multi_label == 0 and not hasattr(ours, "multi_label_logit_scale")
    assert sum(p.numel() for p in ours.parameters()) == 55_726_609
    check(ours_outputs(ours, image, text), ref, "release 224², multi_label=0, HF->ours")


def test_cli_hf_directory_loads_with_from_pretrained(tmp_path):
    from groupvit_fast.convert import main
    torch.manual_seed(0)
    ours = perturb(build_model(small_cfg(2)), seed=21)
    src = tmp_path / "official.pth"
    torch.save({"model": ours.state_dict(), "epoch": 1}, src)
    out = tmp_path / "hf_model"
    # heads are not in the shapes: from a file without config they must be given
    assert main([str(src), str(out), "--to", "hf", "--num-heads", "2"]) == 0
    hf, info = GroupViTModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing/unexpected/mismatched keys
    hf.eval()
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(22))
    text = tokens(2, 500, 16, seed=23)
    check(ours_outputs(ours, image, text), hf_outputs(hf, image, text), "small, HF directory")
    back = load_checkpoint(out)  # heads etc. from config.json, weights converted back
    assert [l.blocks[0].attn.num_heads for l in back.img_encoder.layers] == [2, 2, 2]
    ref = ours.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in back.state_dict().items())


def test_cli_hf_directory_takes_heads_from_our_saved_config(tmp_path):
    import json
    from groupvit_fast.checkpoint import save_checkpoint
    from groupvit_fast.convert import main
    cfg = dataclasses.replace(small_cfg(0), img=dataclasses.replace(small_cfg(0).img,
                                                                     num_heads=[4, 4, 4]))
    src = tmp_path / "ours.pth"
    save_checkpoint(build_model(cfg), src, config=cfg)
    assert main([str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    with open(tmp_path / "hf" / "config.json") as fh:
        assert json.load(fh)["vision_config"]["num_attention_heads"] == 4


def test_assign_scale_is_folded_into_the_hf_weights(tmp_path):
    """A recipe model with assign_scale (the embedded default's [1, 8]) exports to a HF
    directory that computes the same soft maps, groups and embeddings: the scale moves into
    the q projection. Options HF cannot express are refused by name."""
    from groupvit_fast.checkpoint import save_checkpoint
    from groupvit_fast.convert import ConversionError, main, save_hf_pretrained
    cfg = small_cfg(0)
    cfg = dataclasses.replace(cfg, img=dataclasses.replace(cfg.img, assign_scale=[1.0, 8.0]))
    torch.manual_seed(0)
    ours = perturb(build_model(cfg), seed=31)
    src = tmp_path / "ours.pth"
    save_checkpoint(ours, src, config=cfg)
    assert main([str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = GroupViTModel.from_pretrained(tmp_path / "hf").eval()
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(32))
    text = tokens(2, 500, 16, seed=33)
    a = ours_outputs(ours, image, text)
    check(a, hf_outputs(hf, image, text), "assign_scale [1, 8], HF directory")
    # without the fold the stage-2 maps differ: the check above is not vacuous
    plain = perturb(build_model(small_cfg(0)), seed=31)
    plain.load_state_dict(ours.state_dict())
    assert (ours_outputs(plain, image, text)["soft"][1] - a["soft"][1]).abs().max() > 1e-2
    # a file conversion folds the scale too when the checkpoint carries its config
    assert main([str(src), str(tmp_path / "hf.pth"), "--to", "hf"]) == 0
    got = torch.load(tmp_path / "hf.pth")
    key = "vision_model.encoder.stages.1.downsample.assign.q_proj.weight"
    w = ours.state_dict()["img_encoder.layers.1.downsample.assign.q_proj.weight"]
    torch.testing.assert_close(got[key], w * 8.0 * math.sqrt(64))
    for opt, value in (("pool_owned", True), ("assign_cosine", [False, True]),
                       ("hard_assignment", False)):
        bad = dataclasses.replace(cfg, img=dataclasses.replace(cfg.img, **{opt: value}))
        with pytest.raises(ConversionError, match=opt):
            save_hf_pretrained(ours.state_dict(), tmp_path / f"bad_{opt}", bad)
