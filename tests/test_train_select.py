"""monitor.select_last_epochs: the weights exported at the end of training are those of the
epoch end (within the window) with the best zero-shot mIoU on the *val* split, the choice is
recorded, and an interrupted run resumed from a checkpoint selects exactly as an uninterrupted
one (the selection travels in the trainer state)."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the default recipe on 256 training scenes: 4 steps per epoch, selection at steps 8 and 12
SMALL = ["monitor.progress=false", "monitor.tensorboard=false", "train.epochs=3",
         "checkpoint.save_every_steps=4", "checkpoint.keep_last=10",
         "monitor.select_last_epochs=2", "data.options.synthetic.n_train=256",
         "data.options.synthetic.n_val=40", "data.options.synthetic.n_test=40"]


# train/main.py with the val score of the step-12 pass lowered by 50 points, so that the
# selection must export the earlier weights (the real scores of a 3-epoch run may rank either
# way); every other part of the run is real
RIGGED = r"""
import runpy, sys
from groupvit_fast.training import engine
real = engine.run_val_selection
def rigged(model, cfg):
    res = real(model, cfg)
    if sys._getframe(1).f_locals["step"] == 12:
        res = dict(res, mIoU=res["mIoU"] - 50.0)
    return res
engine.run_val_selection = rigged
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _train(out, cache, *extra, resume=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", GROUPVIT_FAST_CACHE=str(cache))
    cmd = [sys.executable, "-c", RIGGED, os.path.join(ROOT, "train", "main.py")]
    cmd += (["--resume"] if resume else []) + ["--set", f"checkpoint.output_dir={out}", *SMALL,
                                               *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("select")
    cache, full, part = tmp / "cache", tmp / "full", tmp / "part"
    out_full = _train(full, cache)
    _train(part, cache, "train.max_steps=10")  # stops inside the window, after the step-8 pass
    out_res = _train(part, cache, resume=True)
    off = tmp / "off"
    _train(off, cache, "monitor.select_last_epochs=0")
    return dict(full=full, part=part, off=off, cache=cache, out_full=out_full, out_res=out_res)


def _export(run):
    from groupvit_fast.seg.emergence import latest_export
    return torch.load(latest_export(str(run)), map_location="cpu", weights_only=False)


def test_export_holds_the_best_val_weights(runs, monkeypatch):
    from groupvit_fast.training import checkpoint as ckpt
    from groupvit_fast.training.config import build_config
    from groupvit_fast.training.engine import run_val_selection
    import groupvit_fast as gf
    full = runs["full"]
    ex = _export(full)
    sel = ex["selection"]
    assert [r["step"] for r in sel["history"]] == [8, 12]  # ends of the last two epochs
    best = sel["history"][0]  # the step-12 pass scored 50 points lower (RIGGED)
    assert sel["history"][1]["mIoU"] < best["mIoU"] - 40
    assert sel["best"] == best and ex["step"] == 8 and ex["trained_steps"] == 12
    assert f"selected the weights of step {best['step']}" in runs["out_full"]
    summary = json.load(open(full / "summary.json"))
    assert summary["selected"] == best and summary["steps"] == 12
    # the exported weights are the checkpoint's of the selected step, in the official layout
    sd = ckpt.consolidated_state_dict(str(full), ckpt.tag_for(best["step"]), 2)
    last = ckpt.consolidated_state_dict(str(full), ckpt.tag_for(12), 2)
    for k, v in ex["model"].items():
        assert torch.equal(v, sd[k].reshape(v.shape)), k
    assert not torch.equal(ex["model"]["logit_scale"], last["logit_scale"].reshape(()))
    # and score what was recorded for them on val
    cfg = build_config("default", SMALL)
    monkeypatch.setenv("GROUPVIT_FAST_CACHE", str(runs["cache"]))
    model = gf.load_checkpoint(ex).eval()
    res = run_val_selection(model, cfg)
    assert res["mIoU"] == pytest.approx(best["mIoU"], abs=1e-9)
    assert res["bg_thresh"] == best["bg_thresh"] and res["images"] == 40
    # the training-time eval at the end evaluated the selected weights too
    assert json.load(open(full / "eval.json"))["step"] == best["step"]


def test_resumed_run_selects_the_same(runs):
    a, b = _export(runs["full"]), _export(runs["part"])
    assert b["selection"] == a["selection"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert "resumed from" in runs["out_res"] and "step 8: val mIoU" not in runs["out_res"]


def test_selection_config_errors_name_the_field():
    from groupvit_fast.training.config import build_config
    with pytest.raises(ValueError, match=r"monitor.select_last_epochs must be >= 0"):
        build_config("default", ["monitor.select_last_epochs=-1"])
    with pytest.raises(ValueError, match="select_last_epochs=2 needs monitor.eval_dataset .*set "
                                         "monitor.select_last_epochs=0"):
        build_config("default", ["monitor.select_last_epochs=2", "monitor.eval_dataset=None"])
    assert build_config("default", []).monitor.select_last_epochs == 8  # the recipe's window
    with pytest.raises(ValueError, match="select_max_images must be >= 1"):
        build_config("default", ["monitor.select_max_images=0"])


def test_selecting_leaves_the_training_trajectory_alone(runs):
    # the selection passes restore every RNG stream: the run trains exactly as one without them
    from groupvit_fast.training import checkpoint as ckpt
    a = ckpt.consolidated_state_dict(str(runs["full"]), ckpt.tag_for(12), 2)
    b = ckpt.consolidated_state_dict(str(runs["off"]), ckpt.tag_for(12), 2)
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    # without selection the export is the last step's
    assert _export(runs["off"])["step"] == 12 and "selection" not in _export(runs["off"])
