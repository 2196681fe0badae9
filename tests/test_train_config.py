"""Training library pieces that need no launcher: configs and overrides, batch arithmetic, the
official LR schedule and parameter groups, the DeepSpeed config builder, cross-rank BN on 1 rank."""
import math
import os

import pytest
import torch

from groupvit_fast.config import ModelConfig, build_model
from groupvit_fast.training import (BatchConfigError, CosineSchedule, DistBatchNorm1d,
                                    build_config, build_schedule, convert_sync_batchnorm,
                                    param_groups, parse_overrides, plan_batch, scale_lr,
                                    split_decay)
from groupvit_fast.training.config import TrainConfig, parse_value

TINY_MODEL = dict(
    img=dict(img_size=32, patch_size=8, embed_dim=32, depths=[1, 1, 1], num_heads=[2, 2, 2],
             num_group_tokens=[8, 4, 0], num_output_groups=[8, 4]),
    text=dict(width=64, layers=1), output_dim=32, multi_label=2)


# ---------------------------------------------------------------- configs and overrides
def test_parse_values_and_overrides():
    assert parse_value("1e-3") == 1e-3 and isinstance(parse_value("1e-3"), float)
    assert parse_value("[2,2,1]") == [2, 2, 1]
    assert parse_value("true") is True and parse_value("None") is None
    assert parse_value("configs/ds_zero3.json") == "configs/ds_zero3.json"
    assert parse_overrides(["train.base_lr=1e-3", "model.img.depths=[2,2,1]"]) == {
        "train": {"base_lr": 1e-3}, "model": {"img": {"depths": [2, 2, 1]}}}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["train.base_lr"])
    # YAML flow syntax, as the config files write it (unquoted keys are neither JSON nor Python)
    assert parse_value("{n_train: 256, n_val: 40}") == {"n_train": 256, "n_val": 40}
    assert parse_value("[a, 2]") == ["a", 2]
    assert parse_value("yes") == "yes"  # a bare word stays a word, never a YAML 1.1 boolean
    with pytest.raises(ValueError, match="starts like a list or mapping but does not parse"):
        parse_value("{a: [1, 2}")


def test_synthetic_options_that_are_not_a_mapping_are_refused_by_name():
    from groupvit_fast.data import DataConfig
    from groupvit_fast.training.data import make_data_config
    cfg = build_config("default", ["data.options.synthetic={n_train: 256}"])
    assert make_data_config(cfg).synthetic.n_train == 256
    with pytest.raises(TypeError, match=r"synthetic must be a mapping of SyntheticConfig fields "
                                        r".*got str 'n_train'"):
        make_data_config(build_config("default", ["data.options.synthetic=n_train"]))
    with pytest.raises(ValueError, match=r"field\(s\) \['n_trian'\] that SyntheticConfig"):
        DataConfig(synthetic={"n_trian": 3})


def test_release_recipes_match_reference():
    yfcc = build_config("gcc_yfcc")
    assert yfcc.model == ModelConfig()  # the dataclass defaults are the released model
    t = yfcc.train
    assert (t.epochs, t.warmup_epochs, t.batch_size, t.micro_batch_size) == (30, 2, 4096, 256)
    assert (t.base_lr, t.warmup_lr, t.min_lr, t.weight_decay, t.clip_grad) == \
        (1.6e-3, 4e-6, 4e-5, 0.05, 5.0)
    assert tuple(t.betas) == (0.9, 0.999) and t.eps == 1e-8
    red = build_config("gcc_redcap")
    assert red.model.multi_label == 0 and red.data.dataset == "gcc_redcap"
    assert red.train == yfcc.train  # inherited through _base_
    assert build_config(None).train == yfcc.train  # no file: the defaults are the release
    d = build_config("default")
    assert d.data.dataset == "synthetic" and d.model.img.img_size == d.data.img_size


def test_overrides_apply_and_errors_name_the_field():
    cfg = build_config("default", ["train.base_lr=1e-3", "model.img.depths=[2,2,1]",
                                   "deepspeed.zero_stage=3", "train.epochs=2"])
    assert cfg.train.base_lr == 1e-3 and cfg.model.img.depths == [2, 2, 1]
    assert cfg.deepspeed.zero_stage == 3 and cfg.train.epochs == 2
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['lr'\]"):
        build_config("default", ["train.lr=1e-3"])
    with pytest.raises(TypeError, match="train.epochs: expected an integer"):
        build_config("default", ["train.epochs=abc"])
    with pytest.raises(ValueError, match="data.img_size"):
        build_config("default", ["data.img_size=128"])
    with pytest.raises(FileNotFoundError, match="recipes in"):
        build_config("no_such_recipe")


def test_config_file_inheritance(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("_base_: %s\ntrain: {epochs: 3}\n" %
                 os.path.join(os.path.dirname(__file__), "..", "configs", "gcc_redcap.yaml"))
    cfg = build_config(str(p))
    assert cfg.train.epochs == 3 and cfg.model.multi_label == 0 and cfg.train.batch_size == 4096


# ---------------------------------------------------------------- batch arithmetic
def test_batch_plans():
    p = plan_batch(4096, 16, 256)
    assert (p.micro_batch, p.grad_accum) == (256, 1)
    p = plan_batch(4096, 8, 256)  # one 8-GPU node: accumulate 2
    assert (p.micro_batch, p.grad_accum, p.per_rank_batch) == (256, 2, 512)
    p = plan_batch(4096, 32)
    assert (p.micro_batch, p.grad_accum) == (128, 1)
    p = plan_batch(4096, 2, grad_accum=8)
    assert p.micro_batch == 256
    assert "4096 = micro 256 × accumulation 8 × world 2" in p.describe()


def test_batch_errors_explain():
    with pytest.raises(BatchConfigError, match="not divisible by the world size 3"):
        plan_batch(4096, 3)
    with pytest.raises(BatchConfigError,
                       match=r"4096 is not divisible by micro batch 96 × world size 16") as e:
        plan_batch(4096, 16, 96)
    assert "Micro batches that work here" in str(e.value)
    with pytest.raises(BatchConfigError, match="micro batch 256 × accumulation 3 × world 16"):
        plan_batch(4096, 16, 256, 3)
    with pytest.raises(BatchConfigError, match="each of the 32 ranks gets 128 samples"):
        plan_batch(4096, 32, 256)  # 256 × 32 = 8192 > 4096
    with pytest.raises(BatchConfigError, match="positive integer"):
        plan_batch(0, 2)


def test_linear_lr_scaling():
    assert scale_lr(1.6e-3, 4096) == pytest.approx(1.6e-3)
    assert scale_lr(1.6e-3, 2048) == pytest.approx(0.8e-3)  # issue #28's 256×8


# ---------------------------------------------------------------- schedule
def _timm_reference(t, base, lo, wlr, T, W):
    """Independent transcription of timm 0.4.12 CosineLRScheduler._get_lr for cycle_limit=1,
    t_mul=1, decay_rate=1, warmup_prefix=False."""
    if t < W:
        return wlr + t * ((base - wlr) / W)
    i = math.floor(t / T)
    if i < 1:
        return lo + 0.5 * (base - lo) * (1 + math.cos(math.pi * (t - T * i) / T))
    return lo


def test_schedule_matches_timm_semantics():
    s = CosineSchedule(base_lr=1.6e-3, min_lr=4e-5, warmup_lr=4e-6, total_steps=300,
                       warmup_steps=20)
    for t in list(range(0, 25)) + [150, 299, 300, 301, 1000]:
        assert s.value(t) == pytest.approx(_timm_reference(t, 1.6e-3, 4e-5, 4e-6, 300, 20),
                                           rel=1e-12, abs=0)
    assert s.value(0) == 4e-6
    # no warmup prefix: the cosine is already 20 steps in when warm-up ends, so the LR steps
    # *down* from just below base_lr
    assert s.value(19) < s.value(20) < 1.6e-3
    cos20 = 4e-5 + 0.5 * (1.6e-3 - 4e-5) * (1 + math.cos(math.pi * 20 / 300))
    assert s.value(20) == pytest.approx(cos20)
    # the official loop applies f(s-1) at optimizer step s (step_update runs after the step)
    assert s.lr_for_step(0) == s.lr_for_step(1) == 4e-6
    assert s.lr_for_step(21) == s.value(20)


def test_assign_scale_ramp_values_and_config_errors():
    from groupvit_fast.training.schedule import assign_scale_factors
    start = [1.0, 0.125]
    assert assign_scale_factors(start, 0, 8) == [1.0, 0.125]
    assert assign_scale_factors(start, 4, 8) == pytest.approx([1.0, 0.5625])
    assert assign_scale_factors(start, 8, 8) == [1.0, 1.0]
    assert assign_scale_factors(start, 100, 8) == [1.0, 1.0]
    with pytest.raises(ValueError, match="ramp_steps"):
        assign_scale_factors(start, 0, 0)
    cfg = build_config("default", ["train.assign_ramp_start=[1.0,0.125]",
                                   "train.assign_ramp_epochs=10"])
    assert cfg.train.assign_ramp_start == [1.0, 0.125]
    assert build_config("default").train.assign_ramp_start == []  # off in the default
    with pytest.raises(ValueError, match=r"one factor > 0 per grouping stage \(2\)"):
        build_config("default", ["train.assign_ramp_start=[0.5]", "train.assign_ramp_epochs=1"])
    with pytest.raises(ValueError, match=r"one factor > 0 per grouping stage"):
        build_config("default", ["train.assign_ramp_start=[1.0,0.0]",
                                 "train.assign_ramp_epochs=1"])
    with pytest.raises(ValueError, match=r"assign_ramp_epochs must be in \(0, epochs=20\]"):
        build_config("default", ["train.assign_ramp_start=[1.0,0.5]"])
    with pytest.raises(ValueError, match=r"assign_ramp_epochs must be in"):
        build_config("default", ["train.assign_ramp_start=[1.0,0.5]",
                                 "train.assign_ramp_epochs=21"])


def test_release_schedule_step_counts():
    cfg = build_config("gcc_yfcc")
    steps_per_epoch = 28_663_147 // 4096
    s = build_schedule(cfg.train, steps_per_epoch, 4096)
    assert (steps_per_epoch, s.total_steps, s.warmup_steps) == (6997, 209_910, 13_994)
    s2 = build_schedule(cfg.train, 28_663_147 // 2048, 2048)  # halved batch: halved LRs
    assert s2.base_lr == pytest.approx(0.8e-3) and s2.min_lr == pytest.approx(2e-5)
    assert s2.warmup_lr == pytest.approx(2e-6)


# ---------------------------------------------------------------- parameter groups
def test_param_groups_official_rule():
    model = build_model(ModelConfig.from_dict(TINY_MODEL))
    decay, no_decay = split_decay(model)
    for name in ("logit_scale", "multi_label_logit_scale", "img_encoder.pos_embed",
                 "text_encoder.positional_embedding", "text_encoder.token_embedding.weight",
                 "img_projector.linear_hidden.0.weight", "img_projector.linear_out.weight"):
        assert name in decay, name
    assert any("group_token" in n for n in decay)
    for name in ("img_projector.linear_hidden.1.weight", "img_projector.linear_hidden.1.bias",
                 "text_encoder.ln_final.weight", "img_projector.linear_out.bias"):
        assert name in no_decay, name
    params = dict(model.named_parameters())
    assert all(params[n].ndim == 1 or n.endswith(".bias") for n in no_decay)
    assert all(params[n].ndim != 1 and not n.endswith(".bias") for n in decay)
    groups = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(params)


# ---------------------------------------------------------------- DeepSpeed config
def test_ds_config_is_derived_from_training_config(tmp_path):
    from groupvit_fast.training.engine import build_ds_config
    cfg = build_config("gcc_yfcc", ["deepspeed.config=configs/ds_zero3.json",
                                    "train.precision=fp16"])
    conf = build_ds_config(cfg, plan_batch(4096, 8, 256))
    assert conf["train_batch_size"] == 4096 and conf["gradient_accumulation_steps"] == 2
    assert conf["train_micro_batch_size_per_gpu"] == 256 and conf["gradient_clipping"] == 5.0
    assert conf["zero_optimization"]["stage"] == 3 and conf["fp16"]["loss_scale"] == 0
    for stage in (1, 2, 3):
        c = build_config("gcc_yfcc", [f"deepspeed.config=configs/ds_zero{stage}.json"])
        assert build_ds_config(c, plan_batch(4096, 16, 256))["zero_optimization"]["stage"] == stage
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 2048, "zero_optimization": {"stage": 2}}')
    cfg = build_config("gcc_yfcc", [f"deepspeed.config={bad}"])
    with pytest.raises(ValueError, match=r"sets \['train_batch_size'\]"):
        build_ds_config(cfg, plan_batch(4096, 16, 256))


# ---------------------------------------------------------------- cross-rank BN, one rank
def test_dist_batchnorm_single_rank_is_batchnorm_and_keeps_keys():
    model = build_model(ModelConfig.from_dict(TINY_MODEL))
    keys = list(model.state_dict())
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    convert_sync_batchnorm(model)
    assert list(model.state_dict()) == keys
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == 2 and all(isinstance(m, DistBatchNorm1d) for m in bns)
    bn, ref_bn = DistBatchNorm1d(5), torch.nn.BatchNorm1d(5)
    x = torch.randn(6, 5, 3)
    torch.testing.assert_close(bn(x), ref_bn(x))
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)


def test_grad_cache_with_zero3_is_refused_clearly():
    from groupvit_fast.training.engine import check_compat
    cfg = build_config("gcc_yfcc", ["deepspeed.zero_stage=3"])
    check_compat(cfg, plan_batch(4096, 16, 256), 3)  # no accumulation: nothing to cache
    with pytest.raises(ValueError, match="does not support ZeRO-3"):
        check_compat(cfg, plan_batch(4096, 8, 256), 3)
    check_compat(cfg, plan_batch(4096, 8, 256), 2)
    cfg = build_config("gcc_yfcc", ["train.grad_cache=false"])
    check_compat(cfg, plan_batch(4096, 8, 256), 3)


@pytest.mark.parametrize("opt", ["group_loss_weight", "assign_info_weight"])
def test_grad_cache_with_group_loss_is_refused_before_training(opt):
    # the embedding cache keeps pooled features only (no group tokens, no assignment maps);
    # refused once at setup, not per micro batch
    from groupvit_fast.training.engine import check_compat
    cfg = build_config("gcc_yfcc", [f"model.{opt}=1.0"])
    check_compat(cfg, plan_batch(4096, 16, 256), 2)  # no accumulation: the cache is not used
    with pytest.raises(ValueError, match=f"{opt}=1.0 needs the group tokens and assignment maps"):
        check_compat(cfg, plan_batch(4096, 8, 256), 2)
    cfg = build_config("gcc_yfcc", [f"model.{opt}=1.0", "train.grad_cache=false"])
    check_compat(cfg, plan_batch(4096, 8, 256), 2)


def test_dist_batchnorm_mixed_dtypes_match_fp32():
    # DeepSpeed bf16 engines can hand BN a bf16 input with fp32 running statistics
    bn, ref = DistBatchNorm1d(4), torch.nn.BatchNorm1d(4)
    bn.weight.data = bn.weight.data.bfloat16()
    bn.bias.data = bn.bias.data.bfloat16()
    x = torch.randn(8, 4, 2)
    y = bn(x.bfloat16())
    assert y.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref(x), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-2, atol=1e-2)
    assert int(bn.num_batches_tracked) == 1
    bn.eval()
    assert bn(x.bfloat16()).dtype == torch.bfloat16
