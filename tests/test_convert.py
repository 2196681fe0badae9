"""Official layout (ref Appendix A/B, §7.2) and official <-> HF state-dict conversion
(interop_hf §4-§5). The expected layouts are written out here from the spec tables, so the tests
do not read ../shared at run time."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from groupvit_fast import ModelConfig, build_model
from groupvit_fast.checkpoint import infer_model_config, read_checkpoint
from groupvit_fast.convert import (ConversionError, detect_layout, hf_to_official, main,
                                   official_to_hf)

C = 384


def appendix_a_layout():
    """The 239 image-encoder keys of ref Appendix A, in state_dict order, with shapes."""
    out = [("pos_embed", [1, 196, C]), ("patch_embed.proj.weight", [C, 3, 16, 16]),
           ("patch_embed.proj.bias", [C]), ("patch_embed.norm.weight", [C]),
           ("patch_embed.norm.bias", [C])]

    def ln(p):
        return [(p + ".weight", [C]), (p + ".bias", [C])]

    def lin(p, o, i):
        return [(p + ".weight", [o, i]), (p + ".bias", [o])]

    for s, (depth, groups) in enumerate([(6, 64), (3, 8), (3, 0)]):
        if groups:
            out.append((f"layers.{s}.group_token", [1, groups, C]))
        for b in range(depth):
            p = f"layers.{s}.blocks.{b}."
            out += ln(p + "norm1") + lin(p + "attn.qkv", 3 * C, C) + lin(p + "attn.proj", C, C)
            out += ln(p + "norm2") + lin(p + "mlp.fc1", 4 * C, C) + lin(p + "mlp.fc2", C, 4 * C)
        if groups:
            p = f"layers.{s}.downsample."
            out += ln(p + "norm_tokens") + lin(p + "mlp_inter.fc1", 192, groups)
            out += lin(p + "mlp_inter.fc2", groups, 192) + ln(p + "norm_post_tokens")
            out += ln(p + "norm_x") + ln(p + "pre_assign_attn.norm_post")
            for n in ("q_proj", "k_proj", "v_proj", "proj"):
                out += lin(p + "pre_assign_attn.attn." + n, C, C)
            out += ln(p + "pre_assign_attn.norm2") + lin(p + "pre_assign_attn.mlp.fc1", 4 * C, C)
            out += lin(p + "pre_assign_attn.mlp.fc2", C, 4 * C)
            for n in ("q_proj", "k_proj", "v_proj", "proj"):
                out += lin(p + "assign." + n, C, C)
            out += ln(p + "norm_new_x") + lin(p + "mlp_channels.fc1", 4 * C, C)
            out += lin(p + "mlp_channels.fc2", C, 4 * C)
        if s == 1:
            out += ln("layers.1.group_projector.0") + lin("layers.1.group_projector.1.fc1", 192, 64)
            out += lin("layers.1.group_projector.1.fc2", 8, 192)
    out += ln("norm")
    return out


def appendix_b_layout(multi_label=True):
    out = {"logit_scale": []}
    if multi_label:
        out["multi_label_logit_scale"] = []
    W = 256
    out["text_encoder.positional_embedding"] = [77, W]
    for n in range(12):
        p = f"text_encoder.transformer.resblocks.{n}."
        out.update({p + "attn.in_proj_weight": [3 * W, W], p + "attn.in_proj_bias": [3 * W],
                    p + "attn.out_proj.weight": [W, W], p + "attn.out_proj.bias": [W],
                    p + "ln_1.weight": [W], p + "ln_1.bias": [W],
                    p + "mlp.c_fc.weight": [4 * W, W], p + "mlp.c_fc.bias": [4 * W],
                    p + "mlp.c_proj.weight": [W, 4 * W], p + "mlp.c_proj.bias": [W],
                    p + "ln_2.weight": [W], p + "ln_2.bias": [W]})
    out.update({"text_encoder.ln_final.weight": [W], "text_encoder.ln_final.bias": [W],
                "text_encoder.token_embedding.weight": [49408, W]})
    for side, d in (("img", C), ("text", W)):
        p = f"{side}_projector."
        out.update({p + "linear_hidden.0.weight": [4096, d, 1], p + "linear_hidden.0.bias": [4096],
                    p + "linear_hidden.1.weight": [4096], p + "linear_hidden.1.bias": [4096],
                    p + "linear_hidden.1.running_mean": [4096],
                    p + "linear_hidden.1.running_var": [4096],
                    p + "linear_hidden.1.num_batches_tracked": [],
                    p + "linear_out.weight": [256, 4096, 1], p + "linear_out.bias": [256]})
    return out


@pytest.fixture(scope="module")
def release():
    torch.manual_seed(0)
    return build_model(ModelConfig())  # the YFCC release: multi_label=3


@pytest.fixture(scope="module")
def release_sd(release):
    return release.state_dict()


def test_image_encoder_matches_appendix_a(release):
    expected = appendix_a_layout()
    assert len(expected) == 239
    sd = release.img_encoder.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == expected


def test_full_layout_407_and_406(release_sd):
    keys = list(release_sd)
    assert len(keys) == 407
    b = appendix_b_layout(multi_label=True)
    a = {"img_encoder." + k: s for k, s in appendix_a_layout()}
    assert {k: list(v.shape) for k, v in release_sd.items()} == {**a, **b}
    assert release_sd["img_projector.linear_hidden.1.num_batches_tracked"].dtype == torch.int64
    # ref §7.2 block order: scalars, img_encoder, text_encoder, img_projector, text_projector
    blocks = ["logit_scale", "multi_label_logit_scale", "img_encoder.", "text_encoder.",
              "img_projector.", "text_projector."]
    rank = [next(i for i, b in enumerate(blocks) if k == b or k.startswith(b)) for k in keys]
    assert rank == sorted(rank)
    counts = {b: sum(1 for r in rank if blocks[r] == b) for b in blocks}
    assert counts == {"logit_scale": 1, "multi_label_logit_scale": 1, "img_encoder.": 239,
                      "text_encoder.": 148, "img_projector.": 9, "text_projector.": 9}
    # RedCaps: the same without the multi-label temperature
    redcaps = {k: v for k, v in release_sd.items() if k != "multi_label_logit_scale"}
    assert len(redcaps) == 406


def test_parameter_counts(release):
    n = sum(p.numel() for p in release.parameters())
    assert n == 55_726_610
    assert n - release.multi_label_logit_scale.numel() == 55_726_609
    assert sum(p.numel() for p in release.img_encoder.parameters()) == 28_837_136
    assert sum(p.numel() for p in release.text_encoder.parameters()) == 22_145_792
    assert sum(p.numel() for p in release.img_projector.parameters()) == 2_633_984
    assert sum(p.numel() for p in release.text_projector.parameters()) == 2_109_696


def test_infer_release_config(release_sd):
    cfg = infer_model_config(release_sd)
    ref = ModelConfig()
    assert cfg.img == ref.img
    assert cfg.text == ref.text
    assert (cfg.output_dim, cfg.proj_num_layers, cfg.multi_label) == (256, 2, 3)
    redcaps = {k: v for k, v in release_sd.items() if k != "multi_label_logit_scale"}
    assert infer_model_config(redcaps).multi_label == 0


# -- official -> HF ----------------------------------------------------------------------------
def spec_rules(key):
    """interop_hf §4.2/§4.3 written out literally (ordered substring rules), as an independent
    oracle for the table-driven converter. Returns the list of HF keys for one official key."""
    if "qkv" in key:
        parts = key.split(".")
        s, l, p = parts[2], parts[4], parts[-1]
        return [f"vision_model.encoder.stages.{s}.layers.{l}.self_attn.{n}_proj.{p}" for n in "qkv"]
    if "in_proj" in key:
        parts = key.split(".")
        n, p = parts[3], "weight" if key.endswith("weight") else "bias"
        return [f"text_model.encoder.layers.{n}.self_attn.{q}_proj.{p}" for q in "qkv"]
    k = key
    k = k.replace("img_encoder.pos_embed", "vision_model.embeddings.position_embeddings")
    k = k.replace("img_encoder.patch_embed.proj",
                  "vision_model.embeddings.patch_embeddings.projection")
    k = k.replace("img_encoder.patch_embed.norm", "vision_model.embeddings.layernorm")
    k = k.replace("img_encoder.layers", "vision_model.encoder.stages")
    if "res" not in k:
        k = k.replace("blocks", "layers")
    if "pre_assign" not in k:
        k = k.replace("attn", "self_attn")
    if "self_attn" in k and "text" not in k:
        k = k.replace("proj", "out_proj")
    k = k.replace("pre_assign_attn.attn.proj", "pre_assign_attn.attn.out_proj")
    k = k.replace("norm1", "layer_norm1")
    if "pre_assign" not in k:
        k = k.replace("norm2", "layer_norm2")
    k = k.replace("img_encoder.norm", "vision_model.layernorm")
    k = k.replace("text_encoder.token_embedding", "text_model.embeddings.token_embedding")
    k = k.replace("text_encoder.positional_embedding",
                  "text_model.embeddings.position_embedding.weight")
    k = k.replace("text_encoder.transformer.resblocks.", "text_model.encoder.layers.")
    k = k.replace("ln_1", "layer_norm1").replace("ln_2", "layer_norm2")
    k = k.replace("c_fc", "fc1").replace("c_proj", "fc2")
    k = k.replace("text_encoder", "text_model").replace("ln_final", "final_layer_norm")
    k = k.replace("img_projector.linear_hidden.", "visual_projection.")
    k = k.replace("img_projector.linear_out.", "visual_projection.3.")
    k = k.replace("text_projector.linear_hidden", "text_projection")
    k = k.replace("text_projector.linear_out", "text_projection.3")
    return [k]


def test_official_to_hf_agrees_with_spec_rules(release_sd):
    for key, t in release_sd.items():
        got = list(official_to_hf({key: t}))
        if key == "multi_label_logit_scale":
            assert got == []
        else:
            assert got == spec_rules(key), key


def test_official_to_hf_matches_transformers_layout(release_sd):
    from transformers import GroupViTConfig, GroupViTModel
    hf = official_to_hf(release_sd)
    assert len(hf) == 502
    ref = GroupViTModel(GroupViTConfig()).state_dict()
    assert {k: list(v.shape) for k, v in hf.items()} == {k: list(v.shape) for k, v in ref.items()}
    assert "multi_label_logit_scale" not in hf
    # tensor surgery: q|k|v rows, squeezed Conv1d weights
    qkv = release_sd["img_encoder.layers.1.blocks.2.attn.qkv.weight"]
    for i, n in enumerate("qkv"):
        assert torch.equal(hf[f"vision_model.encoder.stages.1.layers.2.self_attn.{n}_proj.weight"],
                           qkv[i * C:(i + 1) * C])
    inp = release_sd["text_encoder.transformer.resblocks.11.attn.in_proj_bias"]
    assert torch.equal(hf["text_model.encoder.layers.11.self_attn.v_proj.bias"], inp[512:])
    assert torch.equal(hf["visual_projection.3.weight"],
                       release_sd["img_projector.linear_out.weight"][:, :, 0])
    assert hf["text_projection.0.weight"].shape == (4096, 256)
    pid = official_to_hf(release_sd, position_ids=True)["text_model.embeddings.position_ids"]
    assert torch.equal(pid, torch.arange(77).unsqueeze(0))


def test_round_trip_is_bitwise(release_sd):
    hf = official_to_hf(release_sd, position_ids=True)
    back = hf_to_official(hf, multi_label_logit_scale=release_sd["multi_label_logit_scale"])
    assert list(back) == list(release_sd)  # official order too
    for k, v in release_sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # without a value for it, the multi-label temperature is simply absent (HF has none)
    assert "multi_label_logit_scale" not in hf_to_official(hf)
    # and HF -> official -> HF is the identity as well
    again = official_to_hf(back)
    assert all(torch.equal(again[k], hf[k]) for k in again) and len(again) == len(hf) - 1


def test_conversion_errors_name_the_keys(release_sd):
    with pytest.raises(ConversionError, match=r"no HF counterpart: img_encoder\.bogus"):
        official_to_hf({**release_sd, "img_encoder.bogus": torch.zeros(1)})
    hf = official_to_hf(release_sd)
    del hf["vision_model.encoder.stages.0.layers.3.self_attn.v_proj.weight"]
    with pytest.raises(ConversionError, match=r"layers\.0\.blocks\.3\.attn\.qkv\.weight: needs "
                                              r"q, k and v projections, missing \['v'\]"):
        hf_to_official(hf)
    with pytest.raises(ConversionError, match=r"no official counterpart: foo\.bar"):
        hf_to_official({"foo.bar": torch.zeros(1), "logit_scale": torch.zeros(())})
    bad = dict(release_sd)
    bad["img_projector.linear_out.weight"] = torch.zeros(256, 4096, 3)
    with pytest.raises(ConversionError,
                       match=r"1x1 Conv1d weight \[out,in,1\], found \[256, 4096, 3\]"):
        official_to_hf(bad)
    assert detect_layout(release_sd) == "official"
    assert detect_layout(official_to_hf(release_sd)) == "hf"
    with pytest.raises(ConversionError, match="mixes official keys"):
        detect_layout(["img_encoder.pos_embed", "vision_model.layernorm.weight"])


def _small():
    from groupvit_fast.config import ImageEncoderConfig, TextEncoderConfig
    return ModelConfig(img=ImageEncoderConfig(img_size=32, patch_size=8, embed_dim=64,
                                              depths=[1, 1, 1], num_heads=[2, 2, 2],
                                              num_group_tokens=[8, 4, 0], num_output_groups=[8, 4],
                                              drop_path_rate=0.0),
                       text=TextEncoderConfig(context_length=16, width=64, layers=2,
                                              vocab_size=1000), output_dim=32, multi_label=2)


def test_cli_round_trip(tmp_path):
    torch.manual_seed(1)
    m = build_model(_small())
    sd = m.state_dict()
    src = tmp_path / "official.pth"
    torch.save({"model": sd, "epoch": 3}, src)
    for ext in (".bin", ".safetensors"):
        hf_path = tmp_path / ("hf" + ext)
        assert main([str(src), str(hf_path), "--to", "hf"]) == 0
        hf = read_checkpoint(hf_path)
        assert detect_layout(hf) == "hf" and set(hf) == set(official_to_hf(sd))
        back_path = tmp_path / ("back" + ext + ".pth")
        scale = float(sd["multi_label_logit_scale"])
        assert main([str(hf_path), str(back_path), "--to", "official",
                     "--multi-label-logit-scale", repr(scale)]) == 0
        back = read_checkpoint(back_path)
        assert set(back) == {"model"}
        assert all(torch.equal(back["model"][k], v) for k, v in sd.items())
    # wrong direction: one clear error, exit status 1
    assert main([str(src), str(tmp_path / "x.pth"), "--to", "official"]) == 1
    assert not (tmp_path / "x.pth").exists()


def test_cli_module_entry_point(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "groupvit_fast.convert",
                          str(tmp_path / "missing.pth"), str(tmp_path / "o.bin"), "--to", "hf"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1 and "missing.pth: no such checkpoint file" in out.stderr


def test_hf_config_mapping():
    from transformers import GroupViTConfig
    from groupvit_fast.convert import hf_config_dict, model_config_from_hf
    d = hf_config_dict(ModelConfig())
    ref = GroupViTConfig().to_dict()  # the HF defaults describe the released model (§1, §2)
    for side in ("vision_config", "text_config"):
        for k, v in d[side].items():
            assert ref[side][k] == v, (side, k, ref[side][k], v)
    assert d["projection_dim"] == ref["projection_dim"] == 256
    assert d["projection_intermediate_dim"] == ref["projection_intermediate_dim"]
    assert abs(d["logit_scale_init_value"] - ref["logit_scale_init_value"]) < 1e-4
    assert model_config_from_hf(d) == ModelConfig(multi_label=0)
    small = _small()
    # HF has no stochastic depth and no multi-label head: those come back as defaults
    expect = dataclasses.replace(small, multi_label=0,
                                 img=dataclasses.replace(small.img, drop_path_rate=0.1))
    assert model_config_from_hf(hf_config_dict(small)) == expect
    bad = dataclasses.replace(small, img=dataclasses.replace(small.img, num_heads=[2, 4, 4],
                                                             mlp_ratio=2.0))
    with pytest.raises(ConversionError, match=r"num_heads \[2, 4, 4\] differ per stage; mlp_ratio"):
        hf_config_dict(bad)
