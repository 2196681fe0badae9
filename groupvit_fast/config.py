"""Model configuration as dataclasses whose defaults are the released GCC+YFCC model
(``group_vit_gcc_yfcc_30e``); ``ModelConfig(multi_label=0)`` is the RedCaps release."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Union


@dataclass
class ImageEncoderConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 0
    embed_dim: int = 384
    embed_factors: List[float] = field(default_factory=lambda: [1, 1, 1])
    depths: List[int] = field(default_factory=lambda: [6, 3, 3])
    num_heads: List[int] = field(default_factory=lambda: [6, 6, 6])
    num_group_tokens: List[int] = field(default_factory=lambda: [64, 8, 0])
    num_output_groups: List[int] = field(default_factory=lambda: [64, 8])
    hard_assignment: bool = True
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    patch_norm: bool = True
    use_checkpoint: bool = False
    pos_embed_type: str = "simple"
    freeze_patch_embed: bool = False
    gumbel_tau: float = 1.0
    #: Gumbel noise in training; None = hard_assignment (the official behaviour). A recipe
    #: option (a departure from the paper), not a release setting.
    gumbel: Optional[Union[bool, List[Optional[bool]]]] = None  # one value or one per stage
    #: scale of the assignment logits q·k; None = dim**-0.5 (official). A recipe option: short
    #: schedules never grow the logits past the Gumbel noise at the official scale.
    assign_scale: Optional[Union[float, List[float]]] = None  # one number or one per stage
    #: cosine assignment logits: q and k L2-normalised before q·k·assign_scale, so the logits
    #: stay within ±assign_scale (neither decay into the noise nor saturate the softmax); False
    #: = official. A recipe option (README), one value or one per stage.
    assign_cosine: Union[bool, List[bool]] = False
    #: pool only the final groups that own a patch into the image embedding; False = official
    #: (the mean of all final groups). A recipe option (README)
    pool_owned: bool = False


@dataclass
class TextEncoderConfig:
    context_length: int = 77
    width: int = 256
    layers: int = 12
    vocab_size: int = 49408
    use_checkpoint: bool = False


@dataclass
class ModelConfig:
    img: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    output_dim: int = 256
    contrast_temperature: float = 0.07
    proj_num_layers: int = 2
    multi_label: int = 3
    share_temperature: bool = False
    multi_label_loss_weight: float = 1.0
    #: group-level multi-label loss (MultiLabelContrastive.group_loss_weight); 0 = official.
    #: A recipe option, a departure from the paper (README)
    group_loss_weight: float = 0.0
    #: group claim loss (losses.group_claim_loss): every caption noun and one shared background
    #: prompt must each be claimed by an owned group; 0 = official. A recipe option (README)
    claim_loss_weight: float = 0.0
    #: the shared background candidate of the claim loss; "" = none (the nouns alone compete)
    claim_background_prompt: str = "a photo of a background."
    #: flatness loss (losses.flat_class_loss) on the rows that stand for the background:
    #: "mean" (the batch's mean owned group), "pixels" (the same mean, each group weighted by
    #: the patches it owns), "share" (each group on its own, weighted by its share of its
    #: image's patches) or "background" (groups claiming the background prompt);
    #: 0 = official. A recipe option (README)
    flat_loss_weight: float = 0.0
    flat_rows: str = "mean"
    #: the flatness term moves only the group embeddings: the noun prompts and the multi-label
    #: temperature enter it as constants. Otherwise it can also be met by pulling the prompts
    #: together or cooling the temperature, which dulls every group's naming. A recipe option
    flat_groups_only: bool = False
    #: content claim loss (losses.content_claim_loss): each caption noun must be carried by the
    #: group whose pixels alone show it; with flat_rows="content" every owned group that
    #: claims no noun is flattened; 0 = official. A recipe option (README)
    content_claim_weight: float = 0.0
    #: images of each local batch the content claim reads (its teacher costs one forward per
    #: owned group); None = all
    content_claim_images: Optional[int] = 16
    #: (image, noun) pairs take part only where the claimant's content leads the runner-up by
    #: this cosine margin
    content_claim_margin: float = 0.1
    #: assignment-information loss (losses.assign_info_loss) on the soft assignment of the
    #: grouping stages in assign_info_stages (0 = the first): sharp per-token assignments that
    #: share each image among the groups; 0 = official. A recipe option (README)
    assign_info_weight: float = 0.0
    assign_info_stages: List[int] = dataclasses.field(default_factory=lambda: [0])
    #: weight of the H(mean) (share the image) term; 0 = sharpness only
    assign_info_balance: float = 1.0
    #: where the H(mean) term is taken: 'image' (each image shares itself out among the groups)
    #: or 'batch' (every group is used by some images of the local batch) or 'objects' (over
    #: the batch, among the tokens outside each image's largest group, the background:
    #: MultiLabelContrastive.object_tokens)
    assign_info_scope: str = "image"

    def to_official(self) -> dict:
        """Keyword arguments of ``MultiLabelContrastive`` in the official nested-dict form."""
        return dict(img_encoder=dict(type="GroupViT", **dataclasses.asdict(self.img)),
                    text_encoder=dict(type="TextTransformer", **dataclasses.asdict(self.text)),
                    output_dim=self.output_dim, contrast_temperature=self.contrast_temperature,
                    proj_num_layers=self.proj_num_layers, multi_label=self.multi_label,
                    share_temperature=self.share_temperature,
                    multi_label_loss_weight=self.multi_label_loss_weight,
                    group_loss_weight=self.group_loss_weight,
                    claim_loss_weight=self.claim_loss_weight,
                    claim_background_tokens=self._claim_tokens(),
                    flat_loss_weight=self.flat_loss_weight, flat_rows=self.flat_rows,
                    flat_groups_only=self.flat_groups_only,
                    content_claim_weight=self.content_claim_weight,
                    content_claim_images=self.content_claim_images,
                    content_claim_margin=self.content_claim_margin,
                    assign_info_weight=self.assign_info_weight,
                    assign_info_stages=list(self.assign_info_stages),
                    assign_info_balance=self.assign_info_balance,
                    assign_info_scope=self.assign_info_scope)

    def _claim_tokens(self):
        if not self.claim_loss_weight or not self.claim_background_prompt:
            return None
        from .data.tokenizer import tokenize
        return tokenize(self.claim_background_prompt, context_length=self.text.context_length)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        img = d.pop("img", None) or d.pop("img_encoder", None) or {}
        text = d.pop("text", None) or d.pop("text_encoder", None) or {}
        img = {k: v for k, v in dict(img).items() if k != "type"}
        text = {k: v for k, v in dict(text).items() if k != "type"}
        _check_fields(ImageEncoderConfig, img, "img")
        _check_fields(TextEncoderConfig, text, "text")
        _check_fields(cls, d, "model")
        return cls(img=ImageEncoderConfig(**img), text=TextEncoderConfig(**text), **d)


def _check_fields(klass, d: dict, where: str):
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {where} config field(s) {unknown}; valid: {sorted(names)}")


def build_model(cfg: Union[ModelConfig, dict, None] = None):
    """Build ``MultiLabelContrastive`` from a ``ModelConfig`` (default: the released YFCC model)
    or a dict (either our field names or the official ``img_encoder``/``text_encoder`` form)."""
    from .models import MultiLabelContrastive
    if cfg is None:
        cfg = ModelConfig()
    elif isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    model = MultiLabelContrastive(**cfg.to_official())
    # kept so that a twin of the same architecture and options (e.g. the random-init model
    # beside a trained one) can be built: options such as assign_scale are not in the weights
    model.model_config = cfg
    return model
