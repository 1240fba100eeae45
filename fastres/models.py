"""The old home of the model, kept so that users' `fastres.models.from_seed_checkpoint`,
`fastres.models.build` and `fastres.models.ResNet` go on working. The model now lives in
fastres.study.models, the eager/Triton switch `build` in fastres.kernels.choice."""

from fastres.kernels import build
from fastres.study.models import CheckpointError, ResNet, forward_flops, from_seed_checkpoint

__all__ = ["CheckpointError", "ResNet", "build", "forward_flops", "from_seed_checkpoint"]
