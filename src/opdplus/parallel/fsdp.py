"""FSDP2 (`configs/accelerate/fsdp.yaml`): each decoder layer, and the rest of the student, is a `fully_shard`
unit; weights, gradients and AdamW state live in shards.

The loss runs through `PolicyScorer`, so FSDP's root hooks gather the embeddings and LM head around the chunked
log-prob computation. Gradients are reduce-scattered as sums, not FSDP's default mean. Forward and backward
passes are collectives, so a process with fewer micro-batches, or with non-finite values, still runs as many.
Sampling and evaluation gather the full weights once (`full_weights`) and generate without collectives, since
processes stop sampling at different lengths; checkpoints gather full weights and optimizer state to process 0.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from opdplus.parallel.base import PolicyScorer, tie
from opdplus.parallel.data_parallel import DataParallel
from opdplus.parallel.launch import reshard_after_forward

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


class FSDP2(DataParallel):
    passes_are_collectives = True

    def wrap(self, model: torch.nn.Module) -> None:
        super().wrap(model)  # every process starts from process 0's weights
        self.policy = shard(model)

    def describe(self) -> str:
        from torch.distributed.fsdp import FSDPModule

        units = sum(isinstance(module, FSDPModule) for module in self.policy.modules())
        local = sum(parameter.to_local().numel() for parameter in self.policy.parameters())
        total = sum(parameter.numel() for parameter in self.policy.parameters())
        return (f"FSDP2 over {self.world_size} processes: {units} units, {local:,} of {total:,} parameters "
                f"on process {self.rank}")

    def reduce_gradients(self) -> None:
        pass  # reduce-scattered (summed) in the backward passes

    @contextlib.contextmanager
    def full_weights(self):
        """Gathered once, kept through every forward inside the block, freed after."""
        from torch.distributed.fsdp import FSDPModule

        units = [module for module in self.policy.modules() if isinstance(module, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(reshard_after_forward(), recurse=False)

    def gathered_weights(self) -> dict:
        return tie(self.model, get_model_state_dict(self.model, options=GATHER))

    def checkpoint_state(self) -> tuple[dict, dict]:
        return self.gathered_weights(), get_optimizer_state_dict(self.model, self.optimizer, options=GATHER)

    def _load_named_optimizer_state(self, state: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))


def shard(model: torch.nn.Module) -> PolicyScorer:
    """FSDP2 over the launch's processes: one unit per decoder layer (FSDP_TRANSFORMER_CLS_TO_WRAP, else the
    model's `_no_split_modules`), the root holding embeddings, final norm and LM head (tied or not)."""
    from torch.distributed.fsdp import fully_shard

    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP") or ",".join(_no_split_modules(model))
    layer_classes = {name.strip() for name in names.split(",") if name.strip()}
    layers = [module for module in model.modules() if type(module).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"FSDP: no module of class {sorted(layer_classes) or '(none named)'} in the student; set "
                         "fsdp_transformer_layer_cls_to_wrap in the accelerate config to its decoder layer class")
    reshard = reshard_after_forward()
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard)
    policy = fully_shard(PolicyScorer(model), reshard_after_forward=reshard)
    for unit in [*layers, policy]:  # each unit's own setting, not inherited
        unit.set_gradient_divide_factor(1.0)  # sum, not mean: the loss is already divided by the global count
        if hasattr(unit, "set_force_sum_reduction_for_comms"):  # newer torch; gloo has no pre-multiplied sum
            unit.set_force_sum_reduction_for_comms(True)
    device = next(model.parameters()).device
    with torch.no_grad():  # FSDP sets itself up in the first forward, which has to be through the root
        policy(torch.ones(1, 2, dtype=torch.long, device=device), torch.ones(1, 2, dtype=torch.long, device=device), 1)
    return policy


def _no_split_modules(model) -> list[str]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(getattr(inner, "_no_split_modules", None) or [])
