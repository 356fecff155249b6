"""What `accelerate launch` asked for, read from the environment it sets for each process."""

from __future__ import annotations

import os


def launch_sharding() -> str | None:
    """"fsdp" or "deepspeed" when `accelerate launch` asked for FSDP or DeepSpeed, None for DDP or one process."""
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") != "none":
            raise ValueError("accelerate launch named a DeepSpeed config file; the opdplus trainer builds its own "
                             "DeepSpeed config: set zero_stage in the accelerate config instead "
                             "(configs/accelerate/deepspeed-zero2.yaml, deepspeed-zero3.yaml)")
        if zero_stage() not in (2, 3):
            raise ValueError(f"accelerate launch asked for DeepSpeed ZeRO stage {zero_stage()}; the opdplus trainer "
                             "runs ZeRO stage 2 or 3 (for 0 or 1 use configs/accelerate/ddp.yaml)")
        for what in ("optimizer", "param"):  # not wired into the trainer's DeepSpeed config: refused, not ignored
            device = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what.upper()}_DEVICE", "none")
            if device not in ("none", ""):
                raise ValueError(f"accelerate launch asked for DeepSpeed offload_{what}_device: {device}, which the "
                                 "opdplus trainer does not support yet: set it to none")
        return "deepspeed"
    if _env_true("ACCELERATE_USE_FSDP"):
        if os.environ.get("FSDP_VERSION", "2") != "2":
            raise ValueError(f"accelerate launch asked for FSDP version {os.environ['FSDP_VERSION']}; the opdplus "
                             "trainer shards with FSDP2 (fully_shard): set fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
        return "fsdp"
    return None


def zero_stage() -> int:
    """The ZeRO stage `accelerate launch` asked for (zero_stage in its DeepSpeed config; accelerate's default is 2)."""
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))


def reshard_after_forward() -> bool:
    """fsdp_reshard_after_forward of the launch config (default true: ZeRO-3-like, false: ZeRO-2-like)."""
    return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true")
