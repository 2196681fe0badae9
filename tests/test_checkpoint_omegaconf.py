"""A checkpoint pickled by the real omegaconf 2.4 (official layout: 'model', 'config' as an
OmegaConf DictConfig with an interpolation, 'epoch', 'metrics'), embedded so the test needs
neither omegaconf nor network access. It was written with::

    torch.save({'model': {'logit_scale': ..., 'multi_label_logit_scale': ...},
                'config': OmegaConf.create(<the yfcc release config, abridged>),
                'epoch': 29, 'max_accuracy': 42.5, 'metrics': {...}}, f)
"""
import base64
import zlib

import pytest
import torch

from groupvit_fast import ModelConfig
from groupvit_fast.checkpoint import (PickledObjectPlaceholder, _model_config_from_dict,
                                      checkpoint_config, placeholder_to_python, read_checkpoint)

OMEGACONF_PTH_B64 = (
    "eNqlmAl8FNUdxycJhLDEQCAQwCSAHG44ch/cCQESJSSE4XAFYZjsTnYmzO7s/+1sQsAnoNBCT7XWVtva+z6xh2gPq/a+1N6H"
    "vbS1tVTtbW1r7Xv/mbe82Q3Q1vkAu/uY9/v+/r95782bGegtmqAoJSVK3jFNma7oJGpaI0Z9THf1utRBu7urTNkTOI4VUlDC"
    "kYmsQ8KJGTYUUCgMR6aw37YTt1wtHdVtA4qirsO06rSMa9npkEaMwYxlxzTXSKYdoo00hWBCOByZxLql2Zl63ICJXpdQt+3o"
    "7g6vMQTFkQJ2TgNMihSxz2gqAyW9BS5M3t6r1NaejkYd2zairuUk06FtJGYQI7bJirohCNWqMMWFUhUui1RysxnbtTRbHzRs"
    "TTZaZjIf5kTT4zTCVBP1p3n6Jpcpd2G6CjMykWLuwEkOWXGoiDoJI67zX3UxBvSaQ5y90fsKM2uPwywKleHIZNZPSxiuzmOF"
    "2VLXQT1thFgHV7eSBunzTwnBHNZ3LoXLwxF+oYgxpLljKQOqouzDSsZDG5JjIajG1J3BYRaA9/81UU3jObtWUtNCMQxiHko4"
    "KZ6RbsP8UxjkQWMMFvTjZRyy9XgarqCwMBISPzXiOC4sOh0pQ3zasUcMokX1qGnA4kDoMWNIZ9F6rCXmvJNwpQqebcbwbNWa"
    "1ZFS1mDYRsJI+l6XmtWZQRwAWkonrBmW9WM3jSXj8t/LKawIR9hoVTC3OpMnWk+hIWzONnlCjRSawmaVWW3WmPPM+afMBWad"
    "yQppNhedNheb6KZFhVaTGTCRZy4zZ5lMty2MtQ7qbtTU0tZhA9qlq5JkAzvNM+5nX0KwkqFWUVjNsLmX7vwVW8NOWkthne+n"
    "37PTzu2sl+x0qNCJNuqxMG2EXZINfUoBi4LX7hqHXE3PxKELi91IYZModjOF7pxiu7h6j6R+lQpXB4qt58Vu8aZnQj+kpQ3Q"
    "bCMJvSYvaiuFPi7PvfdT2Bb03svVByT17SqoqLrR3NDbxxxPCc4r2IGqOynsEqq7KVwTVN3BVSOS6rUq7MmqFjFVPltGHRLz"
    "hsle1LyOwj6huZ+CFtTcyzUPSJq6CoNCE3NOOpkkRDODGfwjrV4xzNmgMCRyjlMwc3KOcX1L0h9W4WD+oLK9wYq2E2g7ScER"
    "tlMUIGg7wWWJJJtWwUU5g9meyaT6eLhbebZ8jSB62mWLM2T86K1EXDOSUVYHgRGsY5TCIVHHGIXDOXWMcOARCXi9CjRQh8Hr"
    "uEGq4yjWcYzCcVHHjRRuCtZxlMuekGRPqvAylBtldfBh3UOcTGq3tRNe7l9fIzFoxLSYlYBTCDhN4RUC8EoKrwoCTnHAqyXA"
    "a1R4rQD0HSvwRZOZhGYaeiwNN0vz1LbSYnXeyr6K1fkWRrqVwutEXLdReL1PDSyivHsIbveM3MyNvEEy8kYV7jBrgx0ctj7D"
    "ndlIR83l++BNYSzzzRTeIsq8i8JbA2X2Klz9bZL621V4B2rcyqZGMfvGNd5J4V1C490U3hPUKOAa75U03qfC+/M0PkDhg0Lj"
    "QxQ+HNQo5BofkTQ+qsLHZA2DBc7vhTEj5ZppOGPyMO+m8HER5icofFKMPT+6M1z0U5LoPSqcZWMvJ6h7vaDuo/BpYfAzFD47"
    "TlCfk7TuV+HzqHG3VOQDFB4UGg9R+MI4QX1R0viSCl/OahT5Gl+h8FWh8TUKXx8nqG9IGt9U4VuyBg9qmj8y43wOaK5zkO2A"
    "4GGM7BEKj4rIvk3hOzmRPczlvyvJf0+F7+dH9gMvsh9S+JGw+mMKPxknssckrZ+q8DPUeIRZ7fTL/TmFXwiNX1J4fJzInpA0"
    "fqXCr7MaJb7GkxR+IzR+S+GpcSL7naRxToXfZzUUL7JyPzIn46YyrpdcGp7GzJ6h8KzI7A8U/piT2dNc/0+S/p9V+Et+Zn/1"
    "MvsbheeE179TeH6czP4haf1ThX+hxjNSZi9Q+LfQeJEShW0j82MjBaz5vBIpZD9VUsT+zeqVeLXzhSxGnJRGdNcgE3g3RiET"
    "2RdKilEcWWQStpTk4oaxCyNODhJDSJwiiGzh7BEbf0YtE9SU7poeulSgL0NQmYSeii3T8tClPro8iJ6O6BkyuuPeO/hxp3c7"
    "LhU7H/9uRiq4ALuhkZlImuWz2TUnldgy+zzbv7kNV/jwOUH4XIRfzhtzb3Skiqtk73WkWlRcg4x5UsXzsWVBXsXVPvSKIHQh"
    "Qhf5FQ/zKtidcCoD7WRl7iR6Mj3kkASrdHFBNn/c9rIQ2P4s7ppkiXBzJbLDkptabFma52aJ72ZZ0M1ydLMi6AY3cHwfNGrF"
    "GK1O0OpRu0GiNWJLUx6tzqc1B2ktSGsN0rwdLr9n2PqYQdKkTfDaUX2lxFuFLavzeG0+b02QtxZ563KqK2U4vsMfcaL6IO7w"
    "yXqB7EBAp4TcgC1decj1PnJjELkJkZtzS3zAG80V/rXk2zX2vJtgI0t3M8Qg3cJAD+KukgxcjS1b8gx0+wZ6gwa2ooE+MaMM"
    "PqPOnDtZc3Y7W0txnKWIM6zxNdTPu1+wtyFpQGJvxxY1j93vs3cE2TuRvUti9xb6YfvrNdvWkd2Cdw2qRyTetdiyJ4+32+ft"
    "DfKuQ94+iecNppyHD7JfEDXUPyARdWwZzCPu94nRIDGGREMiRqoYbNERfCsiHtHqJDglQ3i2eLZg195KkrhYxUzkW9IqNowt"
    "B/NXsbhvyQ5aSqClZO4qxh87iIOrGJ9bRsqJmmmSEkkAUoiURBpb3LwkUj42E8SOIHZUDHTTm1s1/nM7fwLWbEIOCd4Yqh+W"
    "eEew5fo83iGfR4O8G5B3NMjr6djT9vi5qo0rAo9vWCs5xs7o9V4u8MdbPRrNED06Ro6z9p7OzZ14f0OzCcMlVjRNbkRHN3FH"
    "w8GzSnyRhOVkyAn8ry1LhviRydQN9E4qOQDllc9NVxT+d+CCr9EqlQnZ12h1fJXXXW2ETUHLSXZ3KUojV7rn2ce4A75XuIjS"
    "XKX9vJL/lkzTbSue5G9Ruruac17N/VdHWws30DEKTxUyROFFDZQrHVkDg2Ou4fAXbN1da/4frjhsy3Vtg3s4ue6JOXzUFl/U"
    "Q5myPvBWsr6hu2v1SzDwfOPSTk6vO9HyJL/zT7gEvTNIb+zuWvtSyt+jKPM9/n1VD16aP1W6AtlB9JLybw5x+qN3xXdd+vrX"
    "KE3nByCWnzaIxUbgYZ2//NOsWHdX3f9opqG1rbGxYWVrU3Nb46q29obWplUtjSubWtqa29rbWtpbWpvaW5tWNjRzlwtXvHB/"
    "mPkIo8sCbjbrU56M0/Kc577Hzu0tT8DKQM+eGcqFpm+uiDyJ5gZEbpFF8mZuro48EcoDOtMrlPwJmNtdHsllge63Vyg5cyev"
    "rzQKg30rZub0bcztK4+hqYG+t0l9L5CdfGlrgjXPUi4x6AZ6i4uXiyFatCLbsyTnc0qh93l2lvfJ+vE7gfLQbO+3t/pOLPb6"
    "lOD53rn/AS99DE4="
)


@pytest.fixture
def official_like(tmp_path):
    path = tmp_path / "ckpt_epoch_29.pth"
    path.write_bytes(zlib.decompress(base64.b64decode(OMEGACONF_PTH_B64)))
    return path


def test_real_omegaconf_pickle_is_read_without_omegaconf(official_like, monkeypatch):
    # omegaconf is not imported even where it is installed: the reader never unpickles it
    with pytest.raises(Exception, match="omegaconf"):
        torch.load(official_like, weights_only=True)
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only"))
                        or real(*a, **k))
    obj = read_checkpoint(official_like)
    assert seen and all(w is True for w in seen)
    assert isinstance(obj["config"], PickledObjectPlaceholder)
    assert obj["config"].pickled_name == "omegaconf.dictconfig.DictConfig"
    assert obj["epoch"] == 29 and obj["metrics"] == {"max_accuracy": 42.5, "max_miou": 52.3}
    assert torch.equal(obj["model"]["multi_label_logit_scale"], torch.tensor(2.5))

    plain = placeholder_to_python(obj["config"])
    assert plain["data"]["text_aug"] == {"max_seq_len": 77, "multi_label": 3, "word_type": "noun"}
    assert plain["train"] == {"epochs": 30, "base_lr": 1.6e-3}
    model = checkpoint_config(obj)
    assert model["multi_label"] == 3  # ${data.text_aug.multi_label} resolved
    assert model["img_encoder"]["num_heads"] == [6, 6, 6]
    cfg = _model_config_from_dict(model)
    assert cfg == ModelConfig()  # the release config, read back from the pickled OmegaConf
