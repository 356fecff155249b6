"""Several processes under `accelerate launch`: data parallel (DDP), sharded (FSDP2, DeepSpeed ZeRO-2/3).

DDP: every process holds the whole student; gradients are summed over processes (each loss is already divided
by the step's global token count), so N processes make the update one process makes on the combined batch.

FSDP2 (`configs/accelerate/fsdp.yaml`): each decoder layer, and the rest of the student, is sharded with
`torch.distributed.fsdp.fully_shard`; the optimizer state lives in shards. The loss runs through `PolicyScorer`,
so that FSDP's root hooks gather the embeddings and LM head around the chunked log-prob computation. Gradients
are reduce-scattered as sums, not FSDP's default mean, for the same invariance as DDP. Sampling and evaluation
gather the full weights once (`full_weights`) and generate without collectives, since processes stop sampling
at different lengths; checkpoints gather full weights and optimizer state to process 0, in the same format as
a single-process run (a run may resume with another number of processes).

DeepSpeed ZeRO (`configs/accelerate/deepspeed-zero2.yaml`, `deepspeed-zero3.yaml`): the loss runs
through a DeepSpeed engine around `PolicyScorer`, in fp32 with AdamW. The engine's gradient accumulation is
unmanaged (every `engine.backward` accumulates, `engine.step` is the boundary), each loss is multiplied by the
number of processes (DeepSpeed averages gradients; the trainer sums them), and DeepSpeed clips. A process that
saw non-finite values back-propagates NaN, so DeepSpeed's own overflow check skips the step on every process.
ZeRO-3 samples inside `deepspeed.zero.GatheredParameters`; checkpoints gather full weights and AdamW's state by
parameter name, the single-process format (ZeRO-3 cannot load it back yet: --resume is refused there).

The teacher is not sharded: it has no gradients or optimizer state; one too big for a device is served instead.
"""

from __future__ import annotations

import contextlib
import math
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

    if is_deepspeed(policy):
        return f"DeepSpeed ZeRO-{policy.zero_optimization_stage()} over {world()[1]} processes"
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
    """FSDP or a DeepSpeed engine: forward and backward passes are collectives, gradients are reduced in them."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule) or is_deepspeed(module)


def is_deepspeed(module) -> bool:
    return type(module).__name__ == "DeepSpeedEngine" or any(
        cls.__name__ == "DeepSpeedEngine" for cls in type(module).__mro__)


@contextlib.contextmanager
def full_weights(policy):
    """Every process holds the student's full weights inside the block (FSDP: gathered once, kept through
    every forward, freed after), so sampling loops of different lengths need no collectives. A no-op unsharded.
    All processes must enter it together."""
    from torch.distributed.fsdp import FSDPModule

    if is_deepspeed(policy):
        with _gathered(policy):
            yield
        return
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


def gathered_weights(policy, student) -> dict | None:
    """The student's full weights when `student` holds only a shard of them (FSDP, ZeRO-3), gathered to process
    0 (the others get empty dicts); None when it holds them whole. Every process must call it."""
    if is_deepspeed(policy):
        return deepspeed_weights(policy, student)
    if not is_sharded(policy):
        return None
    return _tie(student, get_model_state_dict(student, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True)))


def checkpoint_state(policy, student, optimizer) -> tuple[dict | None, dict]:
    """(gathered_weights, optimizer state keyed by parameter name). Sharded: gathered to process 0 (the others
    get empty dicts); every process must call it."""
    weights = gathered_weights(policy, student)
    if is_deepspeed(policy):
        return weights, deepspeed_optimizer_state(policy, student)
    if not is_sharded(policy):
        return weights, get_optimizer_state_dict(student, optimizer)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return weights, get_optimizer_state_dict(student, optimizer, options=options)


def _tie(student, weights: dict) -> dict:
    """Gathered tied weights (embeddings and LM head) come back as separate copies: make each alias the first
    name's tensor again, so that save_pretrained stores it once, as an unsharded model's would be."""
    first_name: dict[int, str] = {}
    for name, parameter in student.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(id(parameter), name)
        if weights and first != name:
            weights[name] = weights[first]
    return weights


def load_optimizer_state(policy, student, optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state, whichever number of processes wrote it."""
    if all(isinstance(key, int) for key in state["state"]):  # an older checkpoint: optimizer.state_dict()
        optimizer.load_state_dict(state)
        return
    if is_deepspeed(policy):
        load_deepspeed_optimizer_state(policy, student, state)
        return
    options = StateDictOptions(full_state_dict=True) if is_sharded(policy) else None
    set_optimizer_state_dict(student, optimizer, state, options=options)


# DeepSpeed ZeRO: see the module's docstring.

def zero_stage() -> int:
    """The ZeRO stage `accelerate launch` asked for (zero_stage in its DeepSpeed config; accelerate's default is 2)."""
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))


def deepspeed_config(max_grad_norm: float | None, stage: int | None = None) -> dict:
    """fp32, no DeepSpeed-managed accumulation: the trainer calls engine.backward per micro-batch and engine.step
    once per update. The batch sizes are DeepSpeed's required bookkeeping: the trainer feeds its own batches."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_optimization": {"stage": zero_stage() if stage is None else stage, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,  # torch's AdamW (the tests: SGD)
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def deepspeed_engine(student: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None,
                     stage: int | None = None):
    """A DeepSpeed engine around PolicyScorer(student) and the trainer's optimizer (whose parameter groups,
    and so the trainer's LR scheduler, DeepSpeed keeps using)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=PolicyScorer(student), optimizer=optimizer,
                                      config=deepspeed_config(max_grad_norm, stage), dist_init_required=False)
    return engine


def deepspeed_backward(engine, loss: torch.Tensor, *, bad: bool = False) -> None:
    """engine.backward with gradients summed over processes (DeepSpeed averages them); bad: back-propagate NaN,
    so that DeepSpeed's overflow check skips the update on every process."""
    engine.backward(loss * (math.nan if bad else world()[1]), scale_wrt_gas=False)


def deepspeed_step(engine) -> tuple[bool, float]:
    """(whether the update was applied, the gradient norm before clipping: inf when it was skipped)."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return engine.was_step_applied(), math.inf if norm is None else float(norm)


@contextlib.contextmanager
def _gathered(engine):
    """ZeRO-3: every process gathers the full parameters, and ZeRO-3's module hooks (which would release and
    gather them again around each layer's forward: collectives) are off inside the block; ZeRO-2: a no-op."""
    if engine.zero_optimization_stage() < 3:
        yield
        return
    import deepspeed

    offload = engine.optimizer.parameter_offload  # DeepSpeed internals: its hooks, removed and set up again
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        offload._remove_module_hooks()
        offload.forward_hooks.clear()
        offload.backward_hooks.clear()
        try:
            yield
        finally:
            offload.setup_zero_stage3_hooks()


def deepspeed_weights(engine, student) -> dict | None:
    """Full weights on process 0 (the others: {}) under ZeRO-3; None under ZeRO-2, which keeps them whole in
    `student`. Every process must call it."""
    if engine.zero_optimization_stage() < 3:
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    weights = _tie(student, {name: safe_get_full_fp32_param(parameter).cpu()
                             for name, parameter in student.named_parameters()})
    persistent = set(student.state_dict())  # not rotary inv_freq and other non-persistent buffers
    weights.update({name: buffer.cpu() for name, buffer in student.named_buffers() if name in persistent})
    return weights if world()[0] == 0 else {}


def deepspeed_optimizer_state(engine, student) -> dict:
    """AdamW's state by parameter name (as torch's get_optimizer_state_dict writes it) on process 0 (the others:
    {}); every process must call it."""
    from deepspeed.utils import safe_get_full_optimizer_state

    main = world()[0] == 0
    named = list(student.named_parameters())
    base = engine.optimizer.optimizer  # the torch AdamW on DeepSpeed's flat fp32 partitions
    flat_state = next(iter(base.state.values()), {})  # empty before the first step (and for plain SGD)
    keys = [key for key, value in flat_state.items() if torch.is_tensor(value) and value.dim() == 1]
    state: dict = {}
    for name, parameter in named:
        if parameter.requires_grad and keys:
            entry = {key: safe_get_full_optimizer_state(parameter, key).cpu() for key in keys}
            if main:
                state[name] = {"step": flat_state["step"].detach().clone().cpu(), **entry} if "step" in flat_state \
                    else entry
    groups = [{**{k: v for k, v in group.items() if k != "params"},
               "params": [name for name, parameter in named if parameter.requires_grad]}
              for group in base.param_groups[:1]]
    return {"state": state, "param_groups": groups} if main else {}


def load_deepspeed_optimizer_state(engine, student, state: dict) -> None:
    """AdamW's state by parameter name into DeepSpeed's partitions; every process must call it."""
    from deepspeed.utils import safe_set_full_optimizer_state

    base = engine.optimizer.optimizer
    for group in base.param_groups:  # AdamW's state is made at its first step: make it now, on the partitions
        for flat in group["params"]:
            if flat not in base.state:
                base.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                    "exp_avg_sq": torch.zeros_like(flat)}
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-2 links it after a first step
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    steps = set()
    for name, parameter in student.named_parameters():
        if parameter.requires_grad and name in state["state"]:
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(parameter, state["state"][name][key], key)
            steps.add(float(state["state"][name]["step"]))
    for group in base.param_groups:  # one step count for every parameter: DeepSpeed's flat partitions share it
        for flat in group["params"]:
            if steps and flat in base.state:
                base.state[flat]["step"] = torch.tensor(max(steps))
