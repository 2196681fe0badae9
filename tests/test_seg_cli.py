"""groupvit-seg: pictures and clear errors."""
import os

import numpy as np
import pytest
import torch.nn.functional as F
import torch
from PIL import Image

from groupvit_fast.seg import cli
from groupvit_fast.seg.evaluate import check_text_encoder
from groupvit_fast.seg.visualize import VIS_MODES, blend, class_palette, save_vis
from test_seg_common import blocky_image, group_text_embedding, model  # noqa: F401


def test_parse_classes():
    assert cli.parse_classes(' cat, dog ,grass,') == ['cat', 'dog', 'grass']
    for bad in ('', ' , ,', ','):
        with pytest.raises(cli.CLIError, match='no class names'):
            cli.parse_classes(bad)
    with pytest.raises(cli.CLIError, match='duplicated'):
        cli.parse_classes('cat,cat')
    with pytest.raises(cli.CLIError, match='background'):
        cli.parse_classes('background,cat')


def test_run_writes_panel_and_official_modes(model, tmp_path):
    im = blocky_image(np.random.RandomState(0), 90, 120)
    p = tmp_path / 'street.png'
    Image.fromarray(im).save(p)
    temb = group_text_embedding(model, im, k=3)
    out = tmp_path / 'out'
    written = cli.run(model, [str(p)], ['cat', 'dog', 'grass'], str(out), text_embedding=temb,
                      img_scale=(512, 96), vis=list(VIS_MODES))
    panel = Image.open(out / 'street.png')
    assert panel.mode == 'RGB'
    assert panel.width > 4 * 120 and panel.height > 90  # 4 tiles: input, pred, 2 group stages
    names = {os.path.basename(w) for w in written}
    assert {'street_input.png', 'street_pred.png', 'street_input_pred.png',
            'street_input_pred_label.png', 'street_all_groups_layer0.png',
            'street_all_groups_layer1.png', 'street_first_group.png',
            'street_final_group.png'} <= names
    pred = Image.open(out / 'street_pred.png')
    assert pred.mode == 'P' and pred.size == (120, 90)
    assert np.asarray(pred).max() <= 3
    assert np.array_equal(np.asarray(Image.open(out / 'street_input.png')), im)


def test_blend_keeps_background_pixels():
    img = np.full((2, 2, 3), 100, np.uint8)
    lab = np.array([[0, 1], [2, 0]])
    pal = class_palette(3, with_bg=True)
    out = blend(img, lab, pal, 0.5, with_bg=True)
    assert (out[0, 0] == 100).all() and (out[1, 1] == 100).all()
    np.testing.assert_array_equal(out[0, 1], ((100 + pal[1].astype(float)) / 2).astype(np.uint8))
    with pytest.raises(ValueError, match='mode'):
        save_vis('x.png', 'bogus', img, lab, ['background', 'a', 'b'], True)


def test_unreadable_image_and_missing_checkpoint(model, tmp_path, capsys):
    bad = tmp_path / 'notes.jpg'
    bad.write_text('hello')
    with pytest.raises(cli.CLIError, match='notes.jpg'):
        cli.run(model, [str(bad)], ['cat'], str(tmp_path / 'o'),
                text_embedding=F.normalize(torch.randn(1, 32), dim=-1))
    assert cli.main([str(tmp_path / 'nope.jpg'), '--classes', 'cat', '--checkpoint', 'x.pth',
                     '--out', str(tmp_path)]) == 2
    assert 'image file not found' in capsys.readouterr().err
    assert cli.main([str(bad), '--classes', ' ', '--checkpoint', 'x.pth',
                     '--out', str(tmp_path)]) == 2
    assert 'no class names' in capsys.readouterr().err
    good = tmp_path / 'g.png'
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    assert cli.main([str(good), '--classes', 'cat', '--checkpoint', str(tmp_path / 'none.pth'),
                     '--out', str(tmp_path)]) == 2
    assert 'checkpoint not found' in capsys.readouterr().err


def test_model_without_text_encoder_is_rejected(model):
    class ImageOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.img_encoder, self.img_projector = m.img_encoder, m.img_projector
            self.text_encoder = None
    with pytest.raises(ValueError, match='text_encoder'):
        check_text_encoder(ImageOnly(model), 'ckpt.pth')
