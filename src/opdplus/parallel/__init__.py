"""How the student is spread over processes, behind one object the trainer holds.

    strategy = make_strategy(launch_sharding())    # SingleProcess, DataParallel, FSDP2 or DeepSpeedZeRO
    strategy.wrap(model)                           # broadcast / shard; the loss then runs through strategy.logprobs
    strategy.attach_optimizer(optimizer, max_grad_norm)
    ... strategy.backward(loss) per micro-batch, strategy.step(bad=...) per update,
        `with strategy.full_weights():` around sampling, strategy.checkpoint_state() for checkpoints

Every strategy gives the update one process would make on the combined batch: each process's loss is already
divided by the step's global token count, and gradients are summed over processes, never averaged.
"""

from opdplus.parallel.base import PolicyScorer, SingleProcess, all_reduce, world
from opdplus.parallel.data_parallel import DataParallel
from opdplus.parallel.launch import launch_sharding, zero_stage


def make_strategy(sharding: str | None = None, *, stage: int | None = None) -> SingleProcess:
    """None: one process, or data parallel under `accelerate launch`; "fsdp": FSDP2; "deepspeed": ZeRO-2/3
    (`stage`, default the launch config's)."""
    if sharding == "fsdp":
        from opdplus.parallel.fsdp import FSDP2

        return FSDP2()
    if sharding == "deepspeed":
        from opdplus.parallel.deepspeed import DeepSpeedZeRO

        return DeepSpeedZeRO(zero_stage() if stage is None else stage)
    if sharding is not None:
        raise ValueError(f"unknown sharding {sharding!r}; choose fsdp or deepspeed")
    return DataParallel() if world()[1] > 1 else SingleProcess()


__all__ = ["DataParallel", "PolicyScorer", "SingleProcess", "all_reduce", "launch_sharding", "make_strategy", "world"]
