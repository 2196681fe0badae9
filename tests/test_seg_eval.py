"""Evaluation protocol without mmseg: geometry, IO, metric accumulation, dataset layouts,
COCO-Object conversion, sharded evaluation; IoUs checked by hand."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from groupvit_fast.seg import coco_object
from groupvit_fast.seg.classes import (COCO_OBJECT_CLASSES, CONTEXT_CLASSES, VOC_CLASSES,
                                       resolve_templates)
from groupvit_fast.seg.datasets import (ArrayDataset, COCOObjectDataset, ContextDataset,
                                        VOCDataset, build_dataset)
from groupvit_fast.seg.evaluate import evaluate_dataset
from groupvit_fast.seg.metrics import IoUAccumulator, intersect_and_union
from groupvit_fast.seg.transforms import (feat_grid, load_image, normalize, preprocess,
                                          rescale_size, resize_rgb, slide_windows)
from test_seg_common import make_coco_object, make_voc


# ----------------------------------------------------------------------------- geometry
def test_rescale_size_short_side_448_long_side_2048():
    assert rescale_size(375, 500) == (448, 597)  # VOC-typical: 500*448/375 = 597.33
    assert rescale_size(500, 375) == (597, 448)
    assert rescale_size(448, 448) == (448, 448)
    assert rescale_size(100, 1000) == (205, 2048)  # long side caps: factor 2.048
    assert rescale_size(1000, 2000) == (448, 896)  # downscale


def test_slide_windows_match_mmseg_grid():
    assert slide_windows(448, 597, (448, 448), (224, 224)) == [(0, 448, 0, 448), (0, 448, 149, 597)]
    assert slide_windows(300, 200, (448, 448), (224, 224)) == [(0, 300, 0, 200)]
    # h_grids = (1000-448+223)//224+1 = 4; the last row is shifted back inside the image
    rows = sorted({w[:2] for w in slide_windows(1000, 448, (448, 448), (224, 224))})
    assert rows == [(0, 448), (224, 672), (448, 896), (552, 1000)]
    assert len(slide_windows(1000, 700, (448, 448), (224, 224))) == 4 * 3


def test_feat_grid_official_and_fallback():
    assert feat_grid(448, 448, 784) == (28, 28)
    assert feat_grid(448, 597, 28 * 37) == (28, 37)
    assert feat_grid(597, 448, 37 * 28) == (37, 28)
    assert feat_grid(64, 64, 64) == (8, 8)
    assert feat_grid(125, 96, 42) == (7, 6)  # the official formula would assert here


def test_resize_and_normalize(tmp_path):
    img = np.array([[[0, 100, 200], [255, 50, 0]]], dtype=np.uint8)  # 1x2
    up = resize_rgb(img, (1, 4))
    # half-pixel bilinear, clamped at the borders: 0, 63.75->64, 191.25->191, 255
    assert up[0, 0].tolist() == [0.0, 64.0, 191.0, 255.0]
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1).expand(3, 2, 2)
    assert normalize(mean.clone()).abs().max() < 1e-6
    x, ori = preprocess(np.zeros((30, 40, 3), np.uint8))
    assert ori == (30, 40) and x.shape == (3, 448, 597)
    torch.testing.assert_close(x[:, 0, 0], -torch.tensor([123.675, 116.28, 103.53]) /
                               torch.tensor([58.395, 57.12, 57.375]))


def test_load_image_variants(tmp_path):
    g = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(g).save(tmp_path / 'grey.png')
    im = load_image(tmp_path / 'grey.png')
    assert im.shape == (3, 4, 3) and (im[..., 0] == g).all()
    (tmp_path / 'bad.jpg').write_bytes(b'\xff\xd8garbage')
    with pytest.raises(ValueError, match='bad.jpg'):
        load_image(tmp_path / 'bad.jpg')
    with pytest.raises(FileNotFoundError, match='missing.jpg'):
        load_image(tmp_path / 'missing.jpg')


def test_class_tables_and_templates():
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[11] == 'table' and VOC_CLASSES[20] == 'monitor'
    assert len(CONTEXT_CLASSES) == 60 and CONTEXT_CLASSES[1] == 'airplane'
    assert len(COCO_OBJECT_CLASSES) == 81 and COCO_OBJECT_CLASSES[1] == 'person'
    assert COCO_OBJECT_CLASSES[-1] == 'toothbrush'
    assert resolve_templates('simple') == ('a photo of a {}.',)
    assert len(resolve_templates('subset')) == 7
    with pytest.raises(ValueError):
        resolve_templates(['no placeholder'])


# ------------------------------------------------------------------------------ metric
def test_intersect_and_union_by_hand():
    label = np.array([[0, 0, 1, 1],
                      [0, 255, 1, 2]])
    pred = np.array([[0, 1, 1, 1],
                     [2, 0, 1, 2]])
    i, u, p, l_ = intersect_and_union(pred, label, 3)
    # ignore pixel (1,1) dropped; class0: label 3 px, pred 1 px (0,0), inter 1 -> union 3
    assert i.tolist() == [1, 3, 1]
    assert p.tolist() == [1, 4, 2]
    assert l_.tolist() == [3, 3, 1]
    assert u.tolist() == [3, 4, 2]


def test_accumulator_sums_over_images_then_divides():
    acc = IoUAccumulator(3)
    acc.update(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0]))  # I=[2,1,0] U=[3,2,0]
    acc.update(np.array([1, 1]), np.array([1, 1]))              # I=[0,2,0] U=[0,2,0]
    iou = acc.iou()
    assert iou[0] == pytest.approx(2 / 3) and iou[1] == pytest.approx(3 / 4)
    assert np.isnan(iou[2])
    s = acc.summary(['bg', 'a', 'b'])
    assert s['mIoU'] == pytest.approx(100 * (2 / 3 + 3 / 4) / 2)  # nanmean, background included
    assert s['per_class']['b']['IoU'] is None and s['num_images'] == 2


# ------------------------------------------------------------------- dataset layouts
def _two_half_image(h=20, w=10, top=0, bottom=15, border=True):
    img = np.zeros((h, w, 3), np.uint8)
    img[h // 2:] = 200
    lab = np.full((h, w), top, np.int64)
    lab[h // 2:] = bottom
    if border:
        lab[h // 2] = 255
    return img, lab


def test_voc_reader_and_hand_checked_miou(tmp_path):
    a = _two_half_image()
    b = _two_half_image(20, 10, 8, 8, border=False)  # all 'cat'
    c = _two_half_image()
    root = make_voc(str(tmp_path / 'VOCdevkit' / 'VOC2012'), {'2007_000001': a, '2007_000002': b,
                                                               'x_not_in_split': c},
                    split_ids=['2007_000001', '2007_000002'])
    ds = build_dataset('voc', str(tmp_path / 'VOCdevkit'))  # parent folder accepted too
    assert isinstance(ds, VOCDataset) and len(ds) == 2 and ds.bg_thresh == 0.95
    img, lab = ds[0]
    assert img.dtype == np.uint8 and img.shape == (20, 10, 3)
    np.testing.assert_array_equal(lab, a[1])  # palette indices, not colours; 255 kept

    def predict_bright_as_person(image):  # bright pixels -> person (15), dark -> background
        return np.where(image[..., 0] > 100, 15, 0)
    r = evaluate_dataset(predict_bright_as_person, ds)
    # image 1: rows 0-9 bg predicted bg (100 px), row 10 ignored, rows 11-19 person (90 px)
    # image 2: all 200 px are cat; predicted 100 bg + 100 person
    # bg: I=100, U=200+100-100=200 -> 50%; person: I=90, U=190+90-90=190; cat: I=0, U=200;
    # every other class is absent from labels and predictions -> NaN, left out of the mean
    assert r['per_class']['background']['IoU'] == pytest.approx(50.0)
    assert r['per_class']['person']['IoU'] == pytest.approx(100 * 90 / 190)
    assert r['per_class']['cat']['IoU'] == pytest.approx(0.0)
    assert r['per_class']['dog']['IoU'] is None
    assert r['mIoU'] == pytest.approx((50 + 100 * 90 / 190 + 0) / 3)


def test_context_and_coco_layouts(tmp_path):
    a = _two_half_image(12, 8, 0, 59, border=False)
    make_voc(str(tmp_path / 'VOC2010'), {'2008_000002': a}, context=True)
    ds = ContextDataset(str(tmp_path / 'VOC2010'))
    assert len(ds) == 1 and ds.bg_thresh == 0.35 and len(ds.class_names) == 60
    assert ds[0][1].max() == 59

    items = {'000000000285': _two_half_image(10, 6, 0, 23, False),
             '000000000139': _two_half_image(8, 8, 1, 80, False)}
    root = make_coco_object(str(tmp_path / 'coco'), items)
    ds = COCOObjectDataset(root)
    assert ds.ids == ['000000000139', '000000000285']  # scanned and sorted like mmseg
    assert ds.label_path(0).endswith('000000000139_instanceTrainIds.png')
    assert ds.bg_thresh == 0.95 and len(ds.class_names) == 81
    np.testing.assert_array_equal(ds[1][1], items['000000000285'][1])
    with pytest.raises(FileNotFoundError, match='image folder not found'):
        COCOObjectDataset(str(tmp_path / 'VOC2010'))


def test_missing_split_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / 'JPEGImages')
    os.makedirs(tmp_path / 'SegmentationClass')
    with pytest.raises(FileNotFoundError, match='val.txt'):
        VOCDataset(str(tmp_path))


def test_coco_object_conversion(tmp_path):
    raw = np.array([[0, 1, 12, 89], [90, 91, 181, 255], [24, 26, 45, 66]], np.uint8)
    src = tmp_path / 'stuff' / 'annotations' / 'val2017'
    os.makedirs(src)
    Image.fromarray(raw).save(src / '000000000139.png')
    Image.fromarray(raw).save(src / '000000000139_labelTrainIds.png')  # skipped ('TrainIds')
    os.makedirs(tmp_path / 'stuff' / 'images' / 'val2017')
    n = coco_object.convert_dataset(str(tmp_path / 'stuff'), str(tmp_path / 'out'), progress=False)
    assert n == 1
    out = np.asarray(Image.open(tmp_path / 'out' / 'annotations' / 'val2017' /
                                '000000000139_instanceTrainIds.png'))
    # person(0)->1, bicycle(1)->2, stop sign(12)->12, toothbrush(89)->80,
    # 90 untouched (not in the official table), stuff and 255 -> 0,
    # 24 (giraffe)->24, 26 (backpack)->25, 45 (wine glass)->41, 66 (dining table)->61
    assert out.tolist() == [[1, 2, 12, 80], [90, 0, 0, 0], [24, 25, 41, 61]]
    assert [COCO_OBJECT_CLASSES[i] for i in (12, 24, 25, 41, 61, 80)] == [
        'stop sign', 'giraffe', 'backpack', 'wine glass', 'dining table', 'toothbrush']
    assert os.path.isdir(tmp_path / 'out' / 'images' / 'val2017')


def test_array_dataset_and_batched_segmenter_interface():
    rng = np.random.RandomState(0)
    samples = [(rng.randint(0, 255, (6, 7, 3), dtype=np.uint8), rng.randint(0, 3, (6, 7)))
               for _ in range(5)]
    ds = ArrayDataset(samples, ['background', 'x', 'y'], bg_thresh=0.5)

    class Oracle:  # predict_batch gets several images per call
        calls = 0

        def predict_batch(self, images):
            Oracle.calls += 1
            return [next(m for im, m in samples if im is img) for img in images]
    r = evaluate_dataset(Oracle(), ds, images_per_batch=2)
    assert r['mIoU'] == pytest.approx(100.0) and r['num_images'] == 5 and Oracle.calls == 3


def test_observers_ride_the_same_predictions():
    """Extra accumulators see every (pred, mask) pair of the one pass, in order, and the
    segmenter is not called again for them."""
    rng = np.random.RandomState(1)
    samples = [(rng.randint(0, 255, (4, 5, 3), dtype=np.uint8), rng.randint(0, 3, (4, 5)))
               for _ in range(5)]
    ds = ArrayDataset(samples, ['background', 'x', 'y'])
    calls = []

    def seg(im):
        calls.append(1)
        return (im[..., 1] // 86).astype(np.int64)

    class Recorder:
        def __init__(self):
            self.seen, self.reduced = [], 0

        def update(self, pred, mask):
            self.seen.append((pred.copy(), mask.copy()))

        def all_reduce(self):
            self.reduced += 1
    class NoReduce:  # all_reduce is optional
        def update(self, pred, mask):
            pass
    rec = Recorder()
    r = evaluate_dataset(seg, ds, observers=[rec, NoReduce()])
    assert len(calls) == 5 and rec.reduced == 1
    assert len(rec.seen) == 5
    for (pred, mask), (im, m) in zip(rec.seen, samples):
        np.testing.assert_array_equal(pred, seg(im))
        np.testing.assert_array_equal(mask, m)
    plain = evaluate_dataset(seg, ds)
    assert r['iou'] == plain['iou'] and r['mIoU'] == plain['mIoU']


def _shard_worker(rank, world, port, out):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=world)
    try:
        rng = np.random.RandomState(0)
        samples = [(rng.randint(0, 255, (5, 6, 3), dtype=np.uint8), rng.randint(0, 4, (5, 6)))
                   for _ in range(7)]
        ds = ArrayDataset(samples, ['background', 'a', 'b', 'c'])
        from groupvit_fast.seg.emergence import ErrorBreakdown
        errors = ErrorBreakdown()
        r = evaluate_dataset(lambda im: (im[..., 0] // 64).astype(np.int64), ds,
                             observers=[errors])
        r['errors'] = errors.summary()
        if rank == 0:
            with open(out, 'w') as f:
                json.dump(r, f)
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_all_reduces_to_single_process_result(tmp_path):
    import socket

    import torch.multiprocessing as mp
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    out = str(tmp_path / 'r.json')
    mp.spawn(_shard_worker, args=(2, port, out), nprocs=2, join=True)
    with open(out) as f:
        dist_r = json.load(f)
    rng = np.random.RandomState(0)
    samples = [(rng.randint(0, 255, (5, 6, 3), dtype=np.uint8), rng.randint(0, 4, (5, 6)))
               for _ in range(7)]
    from groupvit_fast.seg.emergence import ErrorBreakdown
    errors = ErrorBreakdown()
    single = evaluate_dataset(lambda im: (im[..., 0] // 64).astype(np.int64),
                              ArrayDataset(samples, ['background', 'a', 'b', 'c']),
                              observers=[errors])
    # the observer's counts are summed over the two shards too
    assert dist_r['errors'] == json.loads(json.dumps(errors.summary()))  # same integer counts
    assert dist_r['num_images'] == 7
    assert dist_r['iou'] == pytest.approx(single['iou'])
    assert dist_r['mIoU'] == pytest.approx(single['mIoU'])
