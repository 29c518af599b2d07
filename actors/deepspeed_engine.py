"""The trainer's DeepSpeed engine (one rank, CPU or GPU) and the drafter copy it trains."""
from __future__ import annotations

import os
import socket

import torch

from onspec.actors.config import TrainerConfig
from onspec.actors.models import Drafter


def _init_process_group() -> None:
    """DeepSpeed wants torch.distributed even for one process; without a launcher, a one-rank gloo group on a
    free local port. (These variables are DeepSpeed's launcher protocol, written here, not configuration.)"""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # One rank never all-reduces, so DeepSpeed's CPU shared-memory collective is dead weight: it is a C++ op
    # JIT-compiled on first use (1-2 min), and a trainer killed mid-compile leaves a lock file on which every
    # later trainer on that host waits forever. Marking it incompatible makes DeepSpeed skip the build.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def deepspeed_engine(drafter: Drafter, tc: TrainerConfig):
    """A DeepSpeed engine over the drafter's own parameters (the shared target embedding stays frozen).
    ``torch_adam``: the fused CPU Adam is a C++ extension compiled on first use (minutes); torch's AdamW is
    as fast at this size."""
    import deepspeed

    _init_process_group()
    params = [p for p in drafter.parameters() if p.requires_grad]
    config = {"train_micro_batch_size_per_gpu": tc.batch_windows, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": tc.lr, "weight_decay": 0.0, "torch_adam": True}},
              "gradient_clipping": 1.0, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=drafter, model_parameters=params, config=config)
    return engine


def clone_drafter(drafter: Drafter, target) -> Drafter:
    """A separate copy of the drafter's own weights over the same shared target embedding (either kind)."""
    copy = type(drafter)(target.config, drafter.layers, drafter.kept_ids, target.get_input_embeddings())
    copy.load_state_dict(drafter.own_state_dict(), strict=False)
    copy.version = drafter.version
    p = next(drafter.parameters())
    return copy.to(device=p.device, dtype=p.dtype).eval().requires_grad_(False)
