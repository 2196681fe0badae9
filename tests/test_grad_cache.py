"""GradCache accumulation (groupvit_fast.training.grad_cache), one process: a step over a micro
batches of size b has the loss, gradients and BN statistics of one step on the a·b batch —
Gumbel noise and drop-path on — while plain accumulation does not, and activation memory is that
of one micro batch. DeepSpeed engines (ZeRO 0-2) run in a subprocess."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from groupvit_fast.models import GroupViT, MultiLabelContrastive, TextTransformer
from groupvit_fast.training.grad_cache import (SavedTensorMeter, features_loss, grad_cache_step)

VOCAB = 4096
EOT = VOCAB - 1  # the text encoder pools at the argmax id
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors: a second intra-op thread only adds OpenMP barrier spinning on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(multi_label=2, drop_path_rate=0.1, gumbel=True, context_length=16, seed=0):
    torch.manual_seed(seed)
    img = GroupViT(img_size=32, patch_size=8, embed_dim=64, depths=[1, 1, 1],
                   num_heads=[2, 2, 2], num_group_tokens=[8, 4, 0], num_output_groups=[8, 4],
                   drop_path_rate=drop_path_rate)
    if not gumbel:
        for layer in img.layers:
            if layer.downsample is not None:
                layer.downsample.assign.gumbel = False
    txt = TextTransformer(context_length=context_length, width=64, layers=1, vocab_size=VOCAB)
    return MultiLabelContrastive(img, txt, output_dim=32, multi_label=multi_label).train()


def make_batch(n, num_text=3, context_length=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    shape = (n, num_text, context_length) if num_text > 1 else (n, context_length)
    texts = torch.randint(1, EOT, shape, generator=g)
    # EOT (the largest id) at a random position: the text encoder pools at the argmax
    pos = torch.randint(2, context_length, shape[:-1], generator=g)
    texts.scatter_(-1, pos.unsqueeze(-1), EOT)
    return images, texts


def split(images, texts, a):
    # separate tensors, as a loader yields them: chunk views would share the whole batch's storage
    return [(im.clone(), tx.clone()) for im, tx in zip(images.chunk(a), texts.chunk(a))]


def reference_step(net, micro_batches):
    """The full-batch objective with the per-micro-batch random streams of grad_cache_step: the
    encoders run micro batch by micro batch *keeping* their graphs (same RNG consumption order),
    projectors + losses run once on the concatenation, one backward."""
    img, txt = [], []
    for image, text in micro_batches:
        img.append(net.img_encoder(image))
        txt.append(net.text_encoder(text.reshape(-1, text.shape[-1])))
    num_text = micro_batches[0][1].shape[1] if micro_batches[0][1].ndim == 3 else 1
    losses = features_loss(net, torch.cat(img), torch.cat(txt), num_text)
    total = sum(v for k, v in losses.items() if "loss" in k)
    total.backward()
    return {k: v.detach() for k, v in losses.items()}, total.detach()


def full_forward_step(net, images, texts):
    losses = net(images, texts)
    total = sum(v for k, v in losses.items() if "loss" in k)
    total.backward()
    return total.detach()


def naive_accumulation_step(net, micro_batches):
    total = 0.0
    for image, text in micro_batches:
        losses = net(image, text)
        t = sum(v for k, v in losses.items() if "loss" in k) / len(micro_batches)
        t.backward()
        total += t.detach()
    return total


def grads(net):
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def assert_grads_close(got, ref, rtol=1e-4, atol_rel=1e-5, floor=1e-3):
    assert set(got) == set(ref)
    top = max(float(g.abs().max()) for g in ref.values())
    for n in ref:
        # atol relative to the gradient's own scale, floored at 1e-3 of the largest gradient:
        # some gradients are zero up to rounding (e.g. a bias feeding the projector BN, which
        # removes any constant shift) and are pure fp32 cancellation noise
        atol = atol_rel * max(float(ref[n].abs().max()), floor * top)
        torch.testing.assert_close(got[n], ref[n], rtol=rtol, atol=atol,
                                   msg=lambda m, n=n: f"{n} (largest gradient {top:.3g}): {m}")


def rel_diff(got, ref):
    return max(float((got[n] - ref[n]).abs().max() / (ref[n].abs().max() + 1e-12)) for n in ref)


@pytest.mark.parametrize("keep_last", [True, False])
def test_equals_full_batch_step_with_gumbel_and_drop_path(keep_last):
    a, b = 3, 4
    net = tiny_model(drop_path_rate=0.1)
    ref = copy.deepcopy(net)
    mbs = split(*make_batch(a * b), a)

    torch.manual_seed(123)
    out = grad_cache_step(net, mbs, keep_last=keep_last, verify_replay=True)
    rng_gc = torch.get_rng_state()
    torch.manual_seed(123)
    ref_losses, ref_total = reference_step(ref, mbs)
    rng_ref = torch.get_rng_state()

    for k in ("loss", "multi_label_loss"):
        torch.testing.assert_close(out[k], ref_losses[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["total"], ref_total, rtol=1e-5, atol=1e-6)
    g = grads(net)
    assert any(n.startswith("img_encoder.") for n in g) and "logit_scale" in g
    assert_grads_close(g, grads(ref))
    # projector BN: global-batch statistics, running stats updated exactly once
    for (n, x), (_, y) in zip(net.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=n)
        if n.endswith("num_batches_tracked"):
            assert int(x) == 1, n
    # the RNG stream continues as after one pass over the data
    assert torch.equal(rng_gc, rng_ref)


def test_noise_is_really_replayed():
    """The comparison above is only meaningful if the noise differs between micro batches and
    runs: without RNG replay the re-run would not reproduce the cached features."""
    net = tiny_model(drop_path_rate=0.3)
    image, text = make_batch(4)
    with torch.no_grad():
        x1 = net.img_encoder(image)
        x2 = net.img_encoder(image)
    assert not torch.allclose(x1, x2)


def test_deterministic_encoders_equal_one_forward_on_whole_batch_and_naive_differs():
    """drop-path 0 and no Gumbel noise: the grad-cache step equals the model's own forward on the
    a·b batch at once; plain accumulation (b negatives per loss) visibly does not.

    Encoders run in float64 here: batch-size dependent fp32 kernel blocking alone moves the
    gradients by ~1e-5 of their largest entry (the losses still take their logits in fp32)."""
    a, b = 4, 3
    images, texts = make_batch(a * b)
    images = images.double()
    mbs = split(images, texts, a)
    net = tiny_model(drop_path_rate=0.0, gumbel=False).double()
    full = copy.deepcopy(net)
    naive = copy.deepcopy(net)

    out = grad_cache_step(net, mbs)
    full_total = full_forward_step(full, images, texts)
    naive_total = naive_accumulation_step(naive, mbs)

    torch.testing.assert_close(out["total"], full_total, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(net), grads(full), atol_rel=1e-4, floor=1e-2)
    for (n, x), (_, y) in zip(net.named_buffers(), full.named_buffers()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=n)
    # naive: fewer negatives -> a smaller loss and different gradients
    assert float(naive_total) < float(full_total) - 0.5
    assert rel_diff(grads(naive), grads(full)) > 0.05


def test_captions_only_model():
    """multi_label=0 with texts [b,L]."""
    a, b = 2, 3
    images, texts = make_batch(a * b, num_text=1)
    images = images.double()
    net = tiny_model(multi_label=0, drop_path_rate=0.0, gumbel=False).double()
    full = copy.deepcopy(net)
    out = grad_cache_step(net, split(images, texts, a))
    assert set(out) == {"loss", "total"}
    torch.testing.assert_close(out["total"], full_forward_step(full, images, texts),
                               rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(net), grads(full), atol_rel=1e-4, floor=1e-2)


def test_loss_scale_and_custom_backward():
    """A GradScaler-style caller: cached gradients are taken of scale·loss and backward_fn
    multiplies by the same scale, so .grad holds scale × the true gradient."""
    a, b = 2, 3
    mbs = split(*make_batch(a * b), a)
    net = tiny_model(drop_path_rate=0.0, gumbel=False)
    ref = copy.deepcopy(net)
    S = 1024.0
    grad_cache_step(net, mbs, loss_scale=S, backward_fn=lambda s: (s * S).backward())
    grad_cache_step(ref, mbs)
    got = {n: g / S for n, g in grads(net).items()}
    assert_grads_close(got, grads(ref))


def _saved_peak(a, b, keep_last=True):
    """(peak of the encoder passes that keep activations, peak of the whole step)."""
    net = tiny_model(drop_path_rate=0.1)
    mbs = split(*make_batch(a * b), a)
    whole = SavedTensorMeter()
    enc = SavedTensorMeter(parent=whole)
    torch.manual_seed(0)
    with whole():
        grad_cache_step(net, mbs, keep_last=keep_last, encoder_context=enc)
    # every graph was freed: after its backward, or at once for the first-pass graphs
    assert enc.live == 0 and whole.live == 0
    return enc.peak, whole.peak


def test_activation_memory_bounded_by_micro_batch():
    """Saved-for-backward bytes peak at one micro batch's worth: the same for a=2 and a=4 at b=2,
    a fraction of a single b=8 batch. The whole step (first pass, projector + loss over the a·b
    rows, re-runs) stays flat in a too at these sizes, where the a·b-row head is small."""
    e2, w2 = _saved_peak(a=2, b=2)
    e4, w4 = _saved_peak(a=4, b=2)
    e4_rerun_all, _ = _saved_peak(a=4, b=2, keep_last=False)
    full, _ = _saved_peak(a=1, b=8)
    assert e2 > 0
    assert e4 <= 1.05 * e2 and e4_rerun_all <= 1.05 * e2
    assert full >= 3.0 * e4
    assert w4 <= 1.1 * w2


def test_bad_micro_batches_fail_clearly():
    net = tiny_model()
    images, texts = make_batch(5)
    with pytest.raises(ValueError, match="micro batch 1 has shapes"):
        grad_cache_step(net, [(images[:3], texts[:3]), (images[3:], texts[3:])])
    with pytest.raises(ValueError, match="same b"):
        grad_cache_step(net, [(images[:3], texts[:2])])
    with pytest.raises(ValueError, match="empty"):
        grad_cache_step(net, [])
    with pytest.raises(ValueError, match="loss_scale"):
        grad_cache_step(net, [(images, texts)], loss_scale=0.0)
    with pytest.raises(ValueError, match="needs texts"):
        grad_cache_step(net, [(images, texts[:, 0])])


DS_SCRIPT = textwrap.dedent(r"""
    import copy, json, os, sys
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=sys.argv[1]).items():
        os.environ[k] = v
    sys.path.insert(0, os.path.join(sys.argv[2], "tests"))
    import torch, deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine
    torch.set_num_threads(1)
    from test_grad_cache import tiny_model, make_batch, split, reference_step
    from groupvit_fast.training.grad_cache import grad_cache_step
    # DeepSpeed 0.19.8 broadcasts p.data.view(uint8), which fails on the 0-dim logit scales;
    # with one rank there is nothing to broadcast
    DeepSpeedEngine._broadcast_model = lambda self: None
    a, b = 2, 3
    mbs = split(*make_batch(a * b), a)
    res = {}
    for name, stage, gas, managed in [("z2_gas", 2, a, True), ("z1_gas1", 1, 1, True),
                                      ("z2_unmanaged", 2, 1, False), ("z0_gas", 0, a, True)]:
        net = tiny_model(drop_path_rate=0.1)
        ref = copy.deepcopy(net)
        cfg = dict(train_batch_size=gas * b, train_micro_batch_size_per_gpu=b,
                   gradient_accumulation_steps=gas, zero_optimization=dict(stage=stage),
                   zero_allow_untested_optimizer=True, gradient_clipping=0.0)
        if not managed:
            cfg["managed_gradient_accumulation"] = False
        # SGD with lr 1: the update is exactly minus the gradient DeepSpeed reduced
        eng, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
                                       config=cfg)
        torch.manual_seed(7)
        out = grad_cache_step(eng, mbs)
        torch.manual_seed(7)
        _, total = reference_step(ref, mbs)
        # the update q - p must be the reference gradient. ZeRO 1/2 sum the micro batches'
        # gradients in their own fp32 buffers, in another order than autograd's .grad: measured
        # ~1e-5 of the largest gradient, which swamps gradients that are zero up to rounding
        # (biases followed by a LayerNorm/BN), hence the floor at 1e-5 x the largest; a lost or
        # doubled micro batch / head term would be O(1) relative on the large gradients
        err = 0.0
        eps = torch.finfo(torch.float32).eps
        top = max(float(q.grad.abs().max()) for q in ref.parameters())
        with torch.no_grad():
            for (n, p), (_, q) in zip(eng.module.named_parameters(), ref.named_parameters()):
                g = q.grad
                tol = 1e-4 * max(float(g.abs().max()), 0.1 * top) + 4 * eps * float(q.abs().max())
                err = max(err, float(((q - p) - g).abs().max()) / tol)
        res[name] = dict(err=err, loss=float(out["total"]), ref=float(total),
                         steps=int(eng.global_steps))
    print("RESULT" + json.dumps(res))
""")


def test_deepspeed_engine_one_update_per_global_batch(tmp_path):
    pytest.importorskip("deepspeed")
    script = tmp_path / "ds_gc.py"
    script.write_text(DS_SCRIPT)
    port = str(29600 + os.getpid() % 300)
    proc = subprocess.run([sys.executable, str(script), port, REPO], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT"):])
    for name, r in res.items():
        assert r["steps"] == 1, (name, r)
        assert abs(r["loss"] - r["ref"]) < 1e-5 * abs(r["ref"]), (name, r)
        assert r["err"] < 1.0, (name, r)


def test_before_backward_can_abandon_the_step():
    """A non-finite-loss guard sees the global-batch losses before any gradient is written."""
    a, b = 2, 3
    mbs = split(*make_batch(a * b), a)
    net = tiny_model(drop_path_rate=0.0, gumbel=False)
    seen = {}

    class Abort(Exception):
        pass

    def guard(losses):
        seen.update(losses)
        raise Abort

    with pytest.raises(Abort):
        grad_cache_step(net, mbs, before_backward=guard)
    assert set(seen) == {"loss", "multi_label_loss", "total"}
    assert all(p.grad is None for p in net.parameters())


def test_accumulation_mode_selection():
    from groupvit_fast.training.grad_cache import accum_mode_message, resolve_accum_mode
    assert resolve_accum_mode("auto", 16) == "gradcache"
    assert resolve_accum_mode("auto", 1) == "naive"
    assert resolve_accum_mode("naive", 16) == "naive"
    with pytest.raises(ValueError, match="accumulation mode"):
        resolve_accum_mode("cached", 4)
    msg = accum_mode_message("gradcache", 4096, 256, 2, 8)
    assert "4096 negatives" in msg and "GradCache" in msg
    assert "only 2048 negatives" in accum_mode_message("naive", 4096, 256, 2, 8)


def test_group_loss_is_refused_by_the_embedding_cache():
    # the cache keeps pooled features only: the group loss would be dropped silently
    import groupvit_fast as gf
    from groupvit_fast.config import ModelConfig
    d = dict(img=dict(img_size=32, patch_size=8, embed_dim=32, depths=[1, 1, 1],
                      num_heads=[2, 2, 2], num_group_tokens=[4, 2, 0], num_output_groups=[4, 2]),
             text=dict(context_length=16, width=64, layers=1), output_dim=16, multi_label=2,
             group_loss_weight=1.0)
    net = gf.build_model(ModelConfig.from_dict(d)).train()
    mb = (torch.randn(2, 3, 32, 32), torch.randint(1, 400, (2, 3, 16)))
    with pytest.raises(ValueError, match="group_loss_weight > 0 needs the group tokens"):
        grad_cache_step(net, [mb, mb])
