"""Multi-label prompt builder (official WordAugTokenizeWrapper semantics, offline tagger)."""
import numpy as np
import pytest
import torch

from groupvit_fast.data.prompts import (CLIP_TEMPLATES, PromptBuilder, build_prompt_texts, build_prompts,
                                        extract_words)
from groupvit_fast.data.tokenizer import tokenize

# caption -> words the builder may choose (NN, NNS, NNP, VB*; adjectives, numbers, articles dropped)
TABLE = [
    ("a man riding a horse on the beach", ["man", "riding", "horse", "beach"]),
    ("Two dogs are playing with a red ball.", ["dogs", "are", "playing", "ball"]),
    ("a star, a ring and two crosses", ["star", "ring", "crosses"]),
    ("two squares and a triangle", ["squares", "triangle"]),
    ("A circle with a square.", ["circle", "square"]),
    ("three rings", ["rings"]),
    ("a diamond next to a heart", ["diamond", "heart"]),
    ("the Eiffel Tower at night", ["Eiffel", "Tower", "night"]),
    ("very red and blue", []),
]


@pytest.mark.parametrize("caption,words", TABLE)
def test_word_table(caption, words):
    assert extract_words(caption) == words


def test_templates_are_clips_80():
    assert len(CLIP_TEMPLATES) == 80 and len(set(CLIP_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in CLIP_TEMPLATES)
    assert "a photo of a {}." in CLIP_TEMPLATES and "itap of my {}." in CLIP_TEMPLATES


def test_k_words_without_replacement_and_caption_padding():
    rng = np.random.default_rng(0)
    for _ in range(20):
        texts = build_prompt_texts("a man riding a horse on the beach", 3, rng)
        assert texts[0] == "a man riding a horse on the beach" and len(texts) == 4
        chosen = []
        for p in texts[1:]:
            hits = [w for w in ("man", "riding", "horse", "beach")
                    if any(t.format(w) == p for t in CLIP_TEMPLATES)]
            assert len(hits) == 1, p
            chosen.append(hits[0])
        assert len(set(chosen)) == 3  # without replacement
    # one usable word: one prompt, then the caption twice; none: caption four times
    t = build_prompt_texts("three rings", 3, rng)
    assert any(x.format("rings") == t[1] for x in CLIP_TEMPLATES) and t[2:] == ["three rings"] * 2
    assert build_prompt_texts("very red", 3, rng) == ["very red"] * 4


def test_shapes_and_tokens():
    tok = build_prompts("a star and two squares", 3, np.random.default_rng(1))
    assert tok.shape == (4, 77) and tok.dtype == torch.int64
    assert torch.equal(tok[0], tokenize("a star and two squares")[0])
    assert build_prompts("a star", 0).shape == (77,)
    pb = PromptBuilder(3, seed=0)
    assert pb.batch(["a star", "two rings beside a square"]).shape == (2, 4, 77)
    assert PromptBuilder(0).batch(["a star", "b"]).shape == (2, 77)


def test_deterministic_per_seed():
    caps = ["a man riding a horse on the beach", "a star, a ring and two crosses"] * 3
    a = PromptBuilder(3, seed=7).batch(caps)
    b = PromptBuilder(3, seed=7).batch(caps)
    c = PromptBuilder(3, seed=8).batch(caps)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_synthetic_captions_yield_class_nouns():
    from groupvit_fast.data.synthetic import ALL_CLASSES, SyntheticConfig, _CLASS_TABLE, render_sample
    cfg = SyntheticConfig(classes=ALL_CLASSES, bg_caption_prob=0.0)
    forms = {}
    for name in ALL_CLASSES:
        forms[name] = name
        forms[_CLASS_TABLE[name][0]] = name
    for i in range(200):
        _, mask, cap = render_sample(cfg, "train", i)
        words = extract_words(cap)
        present = {cfg.class_names[c] for c in np.unique(mask) if c}
        # every chosen word is a class word, and every visible class is among them
        assert all(w.lower() in forms for w in words), (cap, words)
        assert {forms[w.lower()] for w in words} == present, (cap, words, present)


def test_prompt_template_sets():
    """'simple' puts every chosen word into the evaluation prompt; the default stays official;
    an unknown set fails when the data config is built, naming the choices."""
    from groupvit_fast.data.config import DataConfig
    from groupvit_fast.data.prompts import (CLIP_TEMPLATES, PromptBuilder, build_prompt_texts,
                                            template_set)
    from groupvit_fast.data.tokenizer import tokenize
    rng = np.random.default_rng(0)
    texts = build_prompt_texts("two stars and a ring", 3, rng, template_set("simple"))
    assert sorted(texts[1:3]) == ["a photo of a ring.", "a photo of a stars."]
    pb = PromptBuilder(3, templates="simple", context_length=16)
    tok = pb.batch(["a cross"], [np.random.default_rng(1)])
    assert torch.equal(tok[0, 1], tokenize("a photo of a cross.", 16)[0])
    assert template_set("full") == CLIP_TEMPLATES and DataConfig().prompt_templates == "full"
    with pytest.raises(ValueError, match="simple"):
        DataConfig(prompt_templates="short")
    with pytest.raises(ValueError, match="'{}'"):
        template_set(["no slot"])
