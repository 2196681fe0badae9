from .group_vit import AssignAttention, GroupingBlock, GroupingLayer, GroupViT, PatchEmbed  # noqa
from .layers import Attention, AttnBlock, CrossAttnBlock, Mlp, MixerMlp  # noqa: F401
from .losses import image_text_loss, multi_label_loss  # noqa: F401
from .multi_label_contrastive import MODELS, MultiLabelContrastive, ProjectMLP, build_module  # noqa
from .transformer import TextTransformer  # noqa: F401
