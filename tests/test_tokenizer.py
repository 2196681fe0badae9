"""CLIP BPE tokenizer: official layout (SOT/EOT/zero padding/truncation) and text cleaning."""
import pytest
import torch

import groupvit_fast
from groupvit_fast.data.tokenizer import EOT_TOKEN, SOT_TOKEN, clean_text, decode, encode, tokenize


def test_reference_ids_from_spec():
    # ref §3.5: "a photo of a dog." -> BPE ids [320, 1125, 539, 320, 1929, 269]
    assert encode("a photo of a dog.") == [320, 1125, 539, 320, 1929, 269]
    t = tokenize("a photo of a dog.")
    assert t.shape == (1, 77) and t.dtype == torch.int64
    assert t[0, :8].tolist() == [SOT_TOKEN, 320, 1125, 539, 320, 1929, 269, EOT_TOKEN]
    assert (t[0, 8:] == 0).all()


def test_package_export_and_list_input():
    a = groupvit_fast.tokenize(["a photo of a dog.", "two stars"])
    assert a.shape == (2, 77)
    assert torch.equal(a[1], tokenize("two stars")[0])
    assert tokenize([]).shape == (0, 77)
    assert tokenize("x", context_length=16).shape == (1, 16)


def test_truncation_keeps_eot_last():
    t = tokenize("word " * 200)[0]
    assert t[0] == SOT_TOKEN and t[-1] == EOT_TOKEN
    assert (t != 0).all()
    # EOT pooling takes argmax of ids: the EOT must be the unique maximum
    assert int(t.argmax()) == 76


def test_cleaning_matches_official_rules():
    assert clean_text("  A  Photo\n\tof   a DOG ") == "a photo of a dog"
    assert clean_text("fish &amp;amp; chips") == "fish & chips"  # HTML-unescaped twice
    assert torch.equal(tokenize("A PHOTO of a dog."), tokenize("a photo  of a dog."))
    # ftfy repairs mojibake ("cafÃ©" is UTF-8 bytes read as Latin-1)
    assert clean_text("cafÃ©") == "café"


def test_decode_roundtrip():
    ids = tokenize("two rings beside a square")[0]
    assert decode(ids).strip() == "two rings beside a square"


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="str"):
        tokenize([b"bytes"])
    with pytest.raises(ValueError, match="context_length"):
        tokenize("a", context_length=1)
