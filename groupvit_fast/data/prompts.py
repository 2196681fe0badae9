"""Multi-label text prompts (the official ``WordAugTokenizeWrapper``, ref §6.4), fully offline.

For a caption: POS-tag it, keep the words tagged NN, NNS, NNP or VB/VBD/VBG/VBN/VBP/VBZ (verbs are
kept and NNPS is not, exactly as in the official code), choose ``min(K, #words)`` list positions
without replacement, put each chosen word into one of CLIP's 80 ImageNet templates drawn uniformly,
pad with copies of the caption to K prompts, and tokenise ``[caption, prompt_1..prompt_K]`` into
``[1+K, 77]`` int64.

The official code tags with nltk, whose tagger data cannot be downloaded offline; we use textblob's
``PatternTagger`` (its lexicon ships inside the wheel, Penn tags).  Without textblob a small rule
tagger (stop-word list) keeps every other alphabetic word, with a warning.

Randomness comes only from the ``np.random.Generator`` passed in, so a loader can derive it from
(seed, epoch, sample index) and get the same prompts after a resume, whatever the worker layout.
"""
from __future__ import annotations

import re
import warnings
from functools import lru_cache
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from .tokenizer import tokenize

KEEP_TAGS = frozenset({"NN", "NNS", "NNP", "VBG", "VB", "VBD", "VBN", "VBP", "VBZ"})

#: CLIP's 80 ImageNet prompt templates (the official 'full' set used for training prompts)
CLIP_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.",
    "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.",
    "the plushie {}.", "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.",
    "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.",
)
assert len(CLIP_TEMPLATES) == 80

#: named template sets for training prompts: 'full' is the official one; 'simple' (the
#: evaluation prompt alone) is a recipe option for small text encoders, which otherwise spend
#: their capacity on 80 templates around a single class word
TEMPLATE_SETS = {"full": CLIP_TEMPLATES, "simple": ("a photo of a {}.",)}


def template_set(name_or_templates) -> Sequence[str]:
    """Templates from a name in ``TEMPLATE_SETS`` or an explicit sequence of '{}' strings."""
    if isinstance(name_or_templates, str):
        if name_or_templates not in TEMPLATE_SETS:
            raise ValueError(f"unknown prompt template set {name_or_templates!r}; choose from "
                             f"{sorted(TEMPLATE_SETS)} or give a list of '{{}}' templates")
        return TEMPLATE_SETS[name_or_templates]
    templates = tuple(name_or_templates)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"prompt templates must be non-empty strings with '{{}}', got {bad or templates}")
    return templates

_STOP = frozenset("""a an the and or but of in on at to for with by from as is are was were be been
being this that these those it its there here very some any two three four five one several many
much more most few next near beside over under above below into onto up down out off about after
before while than then so such not no nor only own same too can will just his her their our your
my we you he she they them him i me us""".split())
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


@lru_cache(maxsize=1)
def _pattern_tagger():
    try:
        from textblob.en.taggers import PatternTagger
    except ImportError:
        warnings.warn("textblob is not installed: multi-label prompts use a stop-word rule instead "
                      "of a POS tagger (pip install textblob for the official word selection)")
        return None
    return PatternTagger()


def pos_tag(caption: str):
    """[(word, Penn tag)] for ``caption`` (textblob PatternTagger, or the stop-word fallback)."""
    tagger = _pattern_tagger()
    if tagger is None:
        return [(w, "XX" if w.lower() in _STOP else "NN") for w in _WORD.findall(caption)]
    return [(w, t) for w, t in tagger.tag(caption)]


def extract_words(caption: str) -> List[str]:
    """Words of ``caption`` the prompt builder may choose from, in caption order (with repeats)."""
    return list(_extract_words_cached(caption))


@lru_cache(maxsize=200000)
def _extract_words_cached(caption: str) -> tuple:
    # tagging costs ~0.3 ms a caption; captions recur every epoch (and constantly in the
    # synthetic set), so the cache takes it off the loader's critical path
    return tuple(w for w, t in pos_tag(caption) if t in KEEP_TAGS)


def build_prompt_texts(caption: str, k: int, rng: np.random.Generator,
                       templates: Sequence[str] = CLIP_TEMPLATES) -> List[str]:
    """``[caption, prompt_1, ..., prompt_k]`` as strings (see module doc)."""
    texts = [caption]
    if k <= 0:
        return texts
    words = _extract_words_cached(caption)
    if words:
        idx = rng.choice(len(words), size=min(k, len(words)), replace=False)
        for i in idx:
            template = templates[int(rng.integers(len(templates)))]
            texts.append(template.format(words[int(i)]))
    texts.extend([caption] * (k + 1 - len(texts)))
    return texts


def build_prompts(caption: str, k: int = 3, rng: Optional[np.random.Generator] = None,
                  context_length: int = 77,
                  templates: Sequence[str] = CLIP_TEMPLATES) -> torch.Tensor:
    """Token ids ``[1+k, context_length]`` (or ``[context_length]`` when ``k == 0``)."""
    if k == 0:
        return tokenize(caption, context_length)[0]
    rng = rng if rng is not None else np.random.default_rng()
    return tokenize(build_prompt_texts(caption, k, rng, templates), context_length)


class PromptBuilder:
    """Callable caption -> tokens with its own seeded generator (deterministic per seed)."""

    def __init__(self, k: int = 3, seed: int = 0, context_length: int = 77,
                 templates="full"):
        self.k = int(k)
        self.context_length = context_length
        self.rng = np.random.default_rng(seed)
        self.templates = template_set(templates)

    def __call__(self, caption: str, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        return build_prompts(caption, self.k, rng if rng is not None else self.rng,
                             self.context_length, self.templates)

    def batch(self, captions: Sequence[str], rngs: Optional[Sequence[np.random.Generator]] = None
              ) -> torch.Tensor:
        """``[B, 1+k, L]`` (``[B, L]`` when k == 0), one tokenizer call for the whole batch."""
        if self.k == 0:
            return tokenize(list(captions), self.context_length)
        texts: List[str] = []
        for i, c in enumerate(captions):
            rng = rngs[i] if rngs is not None else self.rng
            texts.extend(build_prompt_texts(c, self.k, rng, self.templates))
        tok = tokenize(texts, self.context_length)
        return tok.view(len(captions), self.k + 1, self.context_length)  # [B*(1+k), L] -> [B, 1+k, L]


__all__ = ["CLIP_TEMPLATES", "TEMPLATE_SETS", "template_set", "KEEP_TAGS", "pos_tag",
           "extract_words", "build_prompt_texts", "build_prompts", "PromptBuilder"]
