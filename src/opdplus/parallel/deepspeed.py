"""DeepSpeed ZeRO-2/3 (`configs/accelerate/deepspeed-zero2.yaml`, `-zero3.yaml`): the loss runs through a
DeepSpeed engine around `PolicyScorer`, in fp32 with the trainer's AdamW.

The engine's gradient accumulation is unmanaged (every `engine.backward` accumulates, `engine.step` is the
boundary), each loss is multiplied by the number of processes (DeepSpeed averages gradients; the trainer sums
them), and DeepSpeed clips. A process that saw non-finite values back-propagates NaN, so DeepSpeed's own overflow
check skips the step on every process. ZeRO-3 samples inside `deepspeed.zero.GatheredParameters`; checkpoints
gather full weights and AdamW's state by parameter name, the single-process format (ZeRO-3 cannot load it back
yet: the trainer refuses --resume there).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch

from opdplus.parallel.base import PolicyScorer, tie
from opdplus.parallel.data_parallel import DataParallel


class DeepSpeedZeRO(DataParallel):
    passes_are_collectives = True

    def __init__(self, stage: int):
        warn_stale_extension_locks()
        super().__init__()
        self.stage = stage

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> None:
        """The engine partitions the optimizer's state (ZeRO-3: the weights too); the trainer's LR scheduler
        keeps driving the optimizer's parameter groups, which DeepSpeed uses."""
        import deepspeed

        super().attach_optimizer(optimizer, max_grad_norm)
        self.policy, *_ = deepspeed.initialize(model=PolicyScorer(self.model), optimizer=optimizer,
                                               config=deepspeed_config(max_grad_norm, self.stage),
                                               dist_init_required=False)

    def describe(self) -> str:
        return f"DeepSpeed ZeRO-{self.policy.zero_optimization_stage()} over {self.world_size} processes"

    def backward(self, loss: torch.Tensor) -> None:
        self.policy.backward(loss * self.world_size, scale_wrt_gas=False)  # summed, not averaged

    def discard(self, loss: torch.Tensor) -> None:
        self.policy.backward(loss * math.nan, scale_wrt_gas=False)  # DeepSpeed then skips the step everywhere

    def reduce_gradients(self) -> None:
        pass  # the engine reduces them

    def step(self, *, bad: bool) -> tuple[bool, float]:
        """DeepSpeed clips and steps, and skips the step when a gradient is not finite (inf norm then)."""
        self.policy.step()
        norm = self.policy.get_global_grad_norm()
        return self.policy.was_step_applied(), math.inf if norm is None else float(norm)

    @contextlib.contextmanager
    def full_weights(self):
        """ZeRO-3: every process gathers the full parameters, and ZeRO-3's module hooks (which would release and
        gather them again around each layer's forward: collectives) are off inside the block; ZeRO-2: a no-op."""
        if self.policy.zero_optimization_stage() < 3:
            yield
            return
        import deepspeed

        offload = self.policy.optimizer.parameter_offload  # DeepSpeed internals: its hooks, removed and set up again
        with deepspeed.zero.GatheredParameters(list(self.policy.module.parameters()), modifier_rank=None):
            offload._remove_module_hooks()
            offload.forward_hooks.clear()
            offload.backward_hooks.clear()
            try:
                yield
            finally:
                offload.setup_zero_stage3_hooks()

    def gathered_weights(self) -> dict | None:
        """Full weights on process 0 (the others: {}) under ZeRO-3; None under ZeRO-2, which keeps them whole."""
        if self.policy.zero_optimization_stage() < 3:
            return None
        from deepspeed.utils import safe_get_full_fp32_param

        weights = tie(self.model, {name: safe_get_full_fp32_param(parameter).cpu()
                                   for name, parameter in self.model.named_parameters()})
        persistent = set(self.model.state_dict())  # not rotary inv_freq and other non-persistent buffers
        weights.update({name: buffer.cpu() for name, buffer in self.model.named_buffers() if name in persistent})
        return weights if self.is_main else {}

    def checkpoint_state(self) -> tuple[dict | None, dict]:
        return self.gathered_weights(), self._named_optimizer_state()

    def _named_optimizer_state(self) -> dict:
        """AdamW's state by parameter name (as torch's get_optimizer_state_dict writes it) on process 0 (the
        others: {}); every process must call it."""
        from deepspeed.utils import safe_get_full_optimizer_state

        named = list(self.model.named_parameters())
        base = self.policy.optimizer.optimizer  # the torch AdamW on DeepSpeed's flat fp32 partitions
        flat_state = next(iter(base.state.values()), {})  # empty before the first step (and for plain SGD)
        keys = [key for key, value in flat_state.items() if torch.is_tensor(value) and value.dim() == 1]
        state: dict = {}
        for name, parameter in named:
            if parameter.requires_grad and keys:
                entry = {key: safe_get_full_optimizer_state(parameter, key).cpu() for key in keys}
                if self.is_main:
                    state[name] = {"step": flat_state["step"].detach().clone().cpu(), **entry} \
                        if "step" in flat_state else entry
        groups = [{**{k: v for k, v in group.items() if k != "params"},
                   "params": [name for name, parameter in named if parameter.requires_grad]}
                  for group in base.param_groups[:1]]
        return {"state": state, "param_groups": groups} if self.is_main else {}

    def _load_named_optimizer_state(self, state: dict) -> None:
        """AdamW's state by parameter name into DeepSpeed's partitions; every process must call it."""
        from deepspeed.utils import safe_set_full_optimizer_state

        engine = self.policy
        base = engine.optimizer.optimizer
        for group in base.param_groups:  # AdamW's state is made at its first step: make it now, on the partitions
            for flat in group["params"]:
                if flat not in base.state:
                    base.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                        "exp_avg_sq": torch.zeros_like(flat)}
        if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-2 links it after a first step
            engine.optimizer._lazy_init_hp_params_optimizer_state()
        steps = set()
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad and name in state["state"]:
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(parameter, state["state"][name][key], key)
                steps.add(float(state["state"][name]["step"]))
        for group in base.param_groups:  # one step count for every parameter: DeepSpeed's flat partitions share it
            for flat in group["params"]:
                if steps and flat in base.state:
                    base.state[flat]["step"] = torch.tensor(max(steps))


def deepspeed_config(max_grad_norm: float | None, stage: int) -> dict:
    """fp32, no DeepSpeed-managed accumulation: the trainer calls engine.backward per micro-batch and engine.step
    once per update. The batch sizes are DeepSpeed's required bookkeeping: the trainer feeds its own batches."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_optimization": {"stage": stage, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,  # torch's AdamW (the tests: SGD)
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


STALE_LOCK_SECONDS = 600


def warn_stale_extension_locks(older_than: float = STALE_LOCK_SECONDS) -> list[Path]:
    """Print one line per old torch-extension build lock, and return them; never delete one.

    DeepSpeed compiles a small op on CPU under a file lock that torch waits on forever: a lock left by a killed
    run makes every later ZeRO start hang without a word. A lock younger than `older_than` may be a build running
    now, so it is left unmentioned."""
    custom = os.environ.get("TORCH_EXTENSIONS_DIR")
    if custom:
        locks = Path(custom).glob("*/lock")
    else:  # torch's default: <user cache>/torch_extensions/py<XY>_<cpu|cuXYZ>/<op>/lock
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        locks = (cache / "torch_extensions").glob("*/*/lock")
    stale = []
    for lock in locks:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:  # removed meanwhile: a build just finished
            continue
        if age > older_than:
            stale.append(lock)
            print(f"opdplus: {lock} is {age / 60:.0f} minutes old; if no build is running, a killed run left it "
                  "and DeepSpeed will wait on it forever: remove it (docs/troubleshooting.md)",
                  file=sys.stderr, flush=True)
    return stale
