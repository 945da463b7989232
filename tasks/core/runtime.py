"""Where and how a stage computes: the device (``auto | cpu | cuda``), mixed precision, seeding, and the
distributed environment that torchrun sets. Shared by train, evaluate, preflight and serving."""
from __future__ import annotations

import os
import random

from tasks.core.errors import UserError


class RuntimeConfigError(UserError):
    """A device or precision setting this machine cannot honour; the message names the key."""


def dist_env() -> tuple[int, int, int]:
    """(WORLD_SIZE, RANK, LOCAL_RANK) from torchrun's environment; (1, 0, 0) for a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def device(want: str, key: str, local_rank: int = 0, devices: int | None = None):
    """The torch device for setting ``key`` (e.g. ``train.device``) = ``want``; on CUDA, this rank's device."""
    import torch

    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeConfigError(f"{key}=cuda but no CUDA device is available; set {key}: cpu or auto")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeConfigError(f"{key.rsplit('.', 1)[0]}.devices={devices} but this node has "
                                     f"{torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def precision(want: str, dev, key: str = "train.precision") -> str:
    """``auto``: bf16 on GPUs that have it (else fp16), fp32 on the CPU; fp16 on the CPU is refused."""
    import torch

    if want != "auto":
        if dev.type == "cpu" and want == "fp16":
            raise RuntimeConfigError(f"{key}=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return want
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def seed_everything(seed: int, deterministic: bool) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:  # cuDNN autotunes its kernels for the shapes it sees: faster, and reruns differ in the last bits
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
