"""GroupViT training: configs and overrides, batch arithmetic, official param groups and LR
schedule, cross-rank BatchNorm, the DeepSpeed engine loop, crash-safe checkpoints and export.

Importing this package does not import DeepSpeed; ``train`` does."""
from .batching import BatchConfigError, BatchPlan, plan_batch, scale_lr  # noqa: F401
from .config import TrainConfig, build_config, parse_overrides  # noqa: F401
from .param_groups import param_groups, split_decay  # noqa: F401
from .schedule import CosineSchedule, build_schedule  # noqa: F401
from .syncbn import DistBatchNorm1d, convert_sync_batchnorm  # noqa: F401


def train(cfg, **kw):
    from .engine import train as _train
    return _train(cfg, **kw)
