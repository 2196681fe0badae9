"""GradCache on 2 ranks (gloo, CPU): a step over a micro batches of size b per rank has the loss,
the rank-averaged gradients and the BN statistics of one step on the whole 2·a·b batch, with
negatives gathered across ranks with gradient (groupvit_fast.distributed.gather_with_grad) and the
projector BatchNorm made cross-rank by groupvit_fast.training.syncbn.convert_sync_batchnorm.

Scenarios, all in one 2-process run (rank 0 saves, the test compares against a one-process
reference built here):
  gumbel:  Gumbel noise + drop-path on, float64 encoders; the reference runs each rank's encoders with that rank's
           RNG stream, micro batch by micro batch, and projector + losses on the concatenation;
  plain:   drop-path 0, Gumbel off, float64 encoders; the reference is the model's own forward on
           the whole 2·a·b batch at once;
  zero2:   the gumbel scenario through a DeepSpeed ZeRO-2 engine (gradient_accumulation_steps=a,
           SGD lr 1: the one update equals minus the reference gradient).
Float64 encoders: a different head batch per process (a·b vs 2·a·b rows) moves fp32 gradients
that are zero up to rounding (biases followed by a LayerNorm/BN) by ~2e-5 of the largest one.
"""
import copy
import os
import socket
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_grad_cache import (assert_grads_close, full_forward_step, grads, make_batch,  # noqa: E402
                             one_thread, reference_step, split, tiny_model)

WORLD, A, B = 2, 2, 2
N = WORLD * A * B


def rank_micro_batches(images, texts, rank):
    n = A * B
    return split(images[rank * n:(rank + 1) * n], texts[rank * n:(rank + 1) * n], A)


def _averaged_grads(net):
    import torch.distributed as dist
    out = {}
    for n, p in net.named_parameters():
        if p.grad is not None:
            g = p.grad.detach().clone()
            dist.all_reduce(g)
            out[n] = g / WORLD
    return out


def _mean(x):
    import torch.distributed as dist
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / WORLD


def _worker(rank, port, out_path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import torch.distributed as dist
    from groupvit_fast.training.grad_cache import grad_cache_step
    from groupvit_fast.training.syncbn import convert_sync_batchnorm
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    res = {}
    images, texts = make_batch(N)

    # gumbel + drop-path, plain module
    net = convert_sync_batchnorm(tiny_model(drop_path_rate=0.1).double())
    torch.manual_seed(1000 + rank)
    out = grad_cache_step(net, rank_micro_batches(images.double(), texts, rank),
                          verify_replay=True)
    res["gumbel"] = dict(loss=_mean(out["total"]), grads=_averaged_grads(net),
                         buffers={n: b.clone() for n, b in net.named_buffers()})

    # deterministic encoders, float64
    net = convert_sync_batchnorm(tiny_model(drop_path_rate=0.0, gumbel=False).double())
    out = grad_cache_step(net, rank_micro_batches(images.double(), texts, rank))
    res["plain"] = dict(loss=_mean(out["total"]), grads=_averaged_grads(net))

    try:
        import deepspeed
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError:
        deepspeed = None
    if deepspeed is not None:
        # every rank builds the same initial model (seed 0), so DeepSpeed's broadcast, which
        # fails on the 0-dim logit scales in 0.19.8, is not needed
        DeepSpeedEngine._broadcast_model = lambda self: None
        net = convert_sync_batchnorm(tiny_model(drop_path_rate=0.1).double())
        cfg = dict(train_batch_size=N, train_micro_batch_size_per_gpu=B,
                   gradient_accumulation_steps=A, zero_optimization=dict(stage=2),
                   zero_allow_untested_optimizer=True, gradient_clipping=0.0)
        eng, *_ = deepspeed.initialize(model=net, config=cfg,
                                       optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
        torch.manual_seed(1000 + rank)
        out = grad_cache_step(eng, rank_micro_batches(images.double(), texts, rank))
        res["zero2"] = dict(loss=_mean(out["total"]), steps=int(eng.global_steps),
                            params={n: p.detach().clone()
                                    for n, p in eng.module.named_parameters()})
    if rank == 0:
        torch.save(res, out_path)
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gc_dist") / "res.pt"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(_free_port()),
                           str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out, weights_only=False)


def _reference_per_rank_streams(net, dtype=torch.float32):
    images, texts = make_batch(N)
    images = images.to(dtype)
    feats_img, feats_txt = [], []
    mbs_all = []
    for r in range(WORLD):
        torch.manual_seed(1000 + r)
        for image, text in rank_micro_batches(images, texts, r):
            feats_img.append(net.img_encoder(image))
            feats_txt.append(net.text_encoder(text.reshape(-1, text.shape[-1])))
            mbs_all.append((image, text))
    # projector + losses on the concatenation, as reference_step does for one stream
    from groupvit_fast.training.grad_cache import features_loss
    losses = features_loss(net, torch.cat(feats_img), torch.cat(feats_txt), texts.shape[1])
    total = sum(v for k, v in losses.items() if "loss" in k)
    total.backward()
    return total.detach()


def test_two_ranks_gumbel_drop_path_equal_full_batch(two_rank_results):
    res = two_rank_results["gumbel"]
    ref = tiny_model(drop_path_rate=0.1).double()
    total = _reference_per_rank_streams(ref, torch.float64)
    torch.testing.assert_close(res["loss"], total, rtol=1e-5, atol=1e-6)
    assert_grads_close(res["grads"], grads(ref), atol_rel=1e-4, floor=1e-2)
    for n, b in ref.named_buffers():
        torch.testing.assert_close(res["buffers"][n], b, rtol=1e-4, atol=1e-6, msg=n)


def test_two_ranks_equal_one_forward_on_whole_batch(two_rank_results):
    res = two_rank_results["plain"]
    images, texts = make_batch(N)
    ref = tiny_model(drop_path_rate=0.0, gumbel=False).double()
    total = full_forward_step(ref, images.double(), texts)
    torch.testing.assert_close(res["loss"], total, rtol=1e-5, atol=1e-6)
    assert_grads_close(res["grads"], grads(ref), atol_rel=1e-4, floor=1e-2)


def test_two_ranks_deepspeed_zero2_one_update(two_rank_results):
    if "zero2" not in two_rank_results:
        pytest.skip("deepspeed not installed")
    res = two_rank_results["zero2"]
    assert res["steps"] == 1
    ref = tiny_model(drop_path_rate=0.1).double()
    init = copy.deepcopy(ref)
    total = _reference_per_rank_streams(ref, torch.float64)
    torch.testing.assert_close(res["loss"], total, rtol=1e-5, atol=1e-6)
    # SGD lr 1: DeepSpeed's update is minus the rank-averaged gradient
    got = {n: init.state_dict()[n] - p for n, p in res["params"].items()}
    assert_grads_close(got, grads(ref), atol_rel=1e-4, floor=1e-2)


if __name__ == "__main__":
    import torch.multiprocessing as mp
    mp.spawn(_worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=WORLD, join=True)
