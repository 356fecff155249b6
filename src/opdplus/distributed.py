"""Several processes under `accelerate launch`: data parallel (DDP) and sharded data parallel (FSDP2).

DDP: every process holds the whole student; gradients are summed over processes (each loss is already divided
by the step's global token count), so N processes make the update one process makes on the combined batch.

FSDP2 (`configs/accelerate/fsdp.yaml`): each decoder layer, and the rest of the student, is sharded with
`torch.distributed.fsdp.fully_shard`; the optimizer state lives in shards. The loss runs through `PolicyScorer`,
so that FSDP's root hooks gather the embeddings and LM head around the chunked log-prob computation. Gradients
are reduce-scattered as sums, not FSDP's default mean, for the same invariance as DDP. Sampling and evaluation
gather the full weights once (`full_weights`) and generate without collectives, since processes stop sampling
at different lengths; checkpoints gather full weights and optimizer state to process 0, in the same format as
a single-process run (a run may resume with another number of processes).

The teacher is not sharded: it has no gradients or optimizer state; one too big for a device is served instead.
DeepSpeed is refused: the trainer does not drive a DeepSpeed engine (TRL's trainer does, opdplus.integrations.trl).
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

from opdplus.logprobs import token_logprobs


def world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group `accelerate launch` set up; (0, 1) otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce(value: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) of a tensor over processes; the tensor itself in one process."""
    if world()[1] > 1:
        value = value.clone()
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX if op == "max" else
                                     torch.distributed.ReduceOp.SUM)
    return value


def all_reduce_gradients(model, *, bad: bool) -> bool:
    """Sum gradients over processes (DDP; FSDP has already reduce-scattered them in the backward pass);
    returns whether any process flagged its batch as bad."""
    if world()[1] > 1 and not is_sharded(model):
        for parameter in model.parameters():
            if parameter.requires_grad:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                torch.distributed.all_reduce(parameter.grad)
    return bool(all_reduce(torch.tensor(float(bad))) > 0)


def broadcast_from_first_process(model: torch.nn.Module) -> None:
    """Every process starts from process 0's weights (as DDP's sync_module_states): fresh random parameters,
    such as LoRA's, would otherwise differ between processes."""
    if world()[1] > 1:
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                torch.distributed.broadcast(tensor.data, src=0)


def launch_sharding() -> str | None:
    """"fsdp" when `accelerate launch` asked for FSDP, None for DDP or one process; DeepSpeed is refused."""
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError("accelerate launch asked for DeepSpeed, which the opdplus trainer does not drive: use "
                         "configs/accelerate/fsdp.yaml (sharded) or ddp.yaml, or opdplus.integrations.trl (TRL's "
                         "trainer runs under DeepSpeed)")
    if _env_true("ACCELERATE_USE_FSDP"):
        if os.environ.get("FSDP_VERSION", "2") != "2":
            raise ValueError(f"accelerate launch asked for FSDP version {os.environ['FSDP_VERSION']}; the opdplus "
                             "trainer shards with FSDP2 (fully_shard): set fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
        return "fsdp"
    return None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true")


class PolicyScorer(torch.nn.Module):
    """The student's log-probs of given tokens as one module forward (what FSDP's root hooks wrap)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
        # a copy, not token_logprobs' view: FSDP hooks the output for the backward pass, which a view may lose
        return token_logprobs(self.model, input_ids, attention_mask, start=start).clone()


def shard(student: torch.nn.Module) -> PolicyScorer:
    """FSDP2 over the launch's processes: one unit per decoder layer (FSDP_TRANSFORMER_CLS_TO_WRAP, else the
    model's `_no_split_modules`), the root holding embeddings, final norm and LM head (tied or not)."""
    from torch.distributed.fsdp import fully_shard

    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP") or ",".join(_no_split_modules(student))
    layer_classes = {name.strip() for name in names.split(",") if name.strip()}
    layers = [module for module in student.modules() if type(module).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"FSDP: no module of class {sorted(layer_classes) or '(none named)'} in the student; set "
                         "fsdp_transformer_layer_cls_to_wrap in the accelerate config to its decoder layer class")
    reshard_after_forward = _reshard_after_forward()
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    policy = fully_shard(PolicyScorer(student), reshard_after_forward=reshard_after_forward)
    for unit in [*layers, policy]:  # each unit's own setting, not inherited
        unit.set_gradient_divide_factor(1.0)  # sum, not mean: the loss is already divided by the global count
        if hasattr(unit, "set_force_sum_reduction_for_comms"):  # newer torch; gloo has no pre-multiplied sum
            unit.set_force_sum_reduction_for_comms(True)
    device = next(student.parameters()).device
    with torch.no_grad():  # FSDP sets itself up in the first forward, which has to be through the root
        policy(torch.ones(1, 2, dtype=torch.long, device=device), torch.ones(1, 2, dtype=torch.long, device=device), 1)
    return policy


def describe_shards(policy) -> str:
    """One line on how the student is sharded, e.g. for the start of a run's log."""
    from torch.distributed.fsdp import FSDPModule

    units = sum(isinstance(module, FSDPModule) for module in policy.modules())
    local = sum(parameter.to_local().numel() for parameter in policy.parameters())
    total = sum(parameter.numel() for parameter in policy.parameters())
    return (f"FSDP2 over {world()[1]} processes: {units} units, {local:,} of {total:,} parameters "
            f"on process {world()[0]}")


def _reshard_after_forward() -> bool:
    """fsdp_reshard_after_forward of the launch config (default true: ZeRO-3-like, false: ZeRO-2-like)."""
    return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"


def _no_split_modules(model) -> list[str]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(getattr(inner, "_no_split_modules", None) or [])


def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def full_weights(policy):
    """Every process holds the student's full weights inside the block (FSDP: gathered once, kept through
    every forward, freed after), so sampling loops of different lengths need no collectives. A no-op unsharded.
    All processes must enter it together."""
    from torch.distributed.fsdp import FSDPModule

    if not is_sharded(policy):
        yield
        return
    units = [module for module in policy.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(_reshard_after_forward(), recurse=False)


def checkpoint_state(policy, student, optimizer) -> tuple[dict | None, dict]:
    """(full weights or None when `student` holds them itself, optimizer state keyed by parameter name).
    Sharded: gathered to process 0 (the others get empty dicts); every process must call it."""
    if not is_sharded(policy):
        return None, get_optimizer_state_dict(student, optimizer)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(student, options=options)
    first_name: dict[int, str] = {}
    for name, parameter in student.named_parameters(remove_duplicate=False):
        # tied weights (embeddings and LM head) come back as separate copies: one tensor again, so that
        # save_pretrained stores it once, as an unsharded model's would be
        first = first_name.setdefault(id(parameter), name)
        if weights and first != name:
            weights[name] = weights[first]
    return weights, get_optimizer_state_dict(student, optimizer, options=options)


def load_optimizer_state(policy, student, optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state, whichever number of processes wrote it."""
    if all(isinstance(key, int) for key in state["state"]):  # an older checkpoint: optimizer.state_dict()
        optimizer.load_state_dict(state)
        return
    options = StateDictOptions(full_state_dict=True) if is_sharded(policy) else None
    set_optimizer_state_dict(student, optimizer, state, options=options)
