"""One process: the reference every other strategy must reproduce, and the interface they all share."""

from __future__ import annotations

import contextlib
import math

import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from opdplus.logprobs import head_logprobs_and_per_position, predicting_states, token_logprobs


def world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group `accelerate launch` set up; (0, 1) otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce(value: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) of a tensor over processes; the tensor itself in one process."""
    if world()[1] > 1:
        device = value.device  # NCCL reduces only tensors on the GPU; counts and flags are often made on the CPU
        value = value.to("cuda", copy=True) if torch.distributed.get_backend() == "nccl" else value.clone()
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX if op == "max" else
                                     torch.distributed.ReduceOp.SUM)
        value = value.to(device)
    return value


class PolicyScorer(torch.nn.Module):
    """The student's log-probs of given tokens as one module forward (what FSDP's root hooks and DeepSpeed's
    engine wrap)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                per_position=None) -> torch.Tensor:
        """[N, T] log-probs of input_ids[:, start:]; with `per_position` [N, T, 2], a number per position from the
        whole next-token distribution beside them (`head_logprobs_and_per_position`)."""
        if per_position is None:
            # a copy, not token_logprobs' view: FSDP hooks the output for the backward pass, which a view may lose
            return token_logprobs(self.model, input_ids, attention_mask, start=start).clone()
        hidden = predicting_states(self.model, input_ids, attention_mask, start=start)
        if hidden is None:
            raise ValueError("the dense and top-k estimators need a model with a separate decoder body and LM head "
                             f"(get_decoder/get_output_embeddings); {type(self.model).__name__} has none")
        return head_logprobs_and_per_position(self.model, hidden, input_ids[:, start:], per_position)


class SingleProcess:
    """The whole student in one process. Subclasses change how gradients meet and where weights live; the
    trainer calls only the methods below."""

    passes_are_collectives = False  # sharded: every forward/backward pass needs every process

    def __init__(self):
        self.rank, self.world_size = world()
        self.is_main = self.rank == 0  # only process 0 writes, evaluates and logs
        self.model: torch.nn.Module | None = None  # the causal LM (with LoRA adapters if any)
        self.policy: torch.nn.Module | None = None  # what the loss runs through
        self.optimizer: torch.optim.Optimizer | None = None
        self.max_grad_norm: float | None = None

    def wrap(self, model: torch.nn.Module) -> None:
        self.model, self.policy = model, PolicyScorer(model)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> None:
        self.optimizer, self.max_grad_norm = optimizer, max_grad_norm

    def describe(self) -> str | None:
        """One line on how the student is spread, for the run's log; None for one process."""
        return None

    def all_reduce(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) over processes, e.g. the step's token count."""
        return all_reduce(value, op)

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                 per_position=None) -> torch.Tensor:
        """[N, L - start] log-probs of input_ids[:, start:], with gradient; [N, L - start, 2] with `per_position`
        (see PolicyScorer)."""
        return self.policy(input_ids, attention_mask, start, per_position)

    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool):
        """Dropout is off, so train mode only switches activation checkpointing on."""
        self.policy.train(gradient_checkpointing)
        try:
            yield
        finally:
            self.policy.eval()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def discard(self, loss: torch.Tensor) -> None:
        """A forward whose loss is not used (non-finite values): where passes are collectives, its backward
        still runs, adding nothing (the update is skipped anyway)."""
        if self.passes_are_collectives:
            self.backward(loss.mul(0))

    def passes_to_match(self, passes: int) -> int:
        """How many empty forward/backward passes this process must add to its `passes` so that every process
        runs as many (only where passes are collectives; processes may hold different numbers of micro-batches).
        Call it before the passes: it is a collective itself."""
        if not self.passes_are_collectives:
            return 0
        return int(all_reduce(torch.tensor(passes), op="max")) - passes

    def run_empty_passes(self, count: int, input_ids, attention_mask, start: int) -> None:
        """`count` passes that add nothing, to take part in the other processes' collectives."""
        for _ in range(count):
            self.backward(self.logprobs(input_ids[:1], attention_mask[:1], start).sum().mul(0))

    def reduce_gradients(self) -> None:
        """Make every process hold the gradient of the whole step (nothing to do alone)."""

    def step(self, *, bad: bool) -> tuple[bool, float]:
        """Apply the accumulated gradients unless any process saw non-finite values (`bad`) or the gradient is
        not finite: (applied, gradient norm before clipping). Clears the gradients either way."""
        self.reduce_gradients()
        bad_anywhere = bool(all_reduce(torch.tensor(float(bad))) > 0)
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm or math.inf)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        applied = not bad_anywhere and math.isfinite(norm)  # never apply a NaN/inf update
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied, norm

    @contextlib.contextmanager
    def full_weights(self):
        """Inside the block every process holds the full weights, so sampling needs no collectives. All
        processes must enter it together."""
        yield

    def gathered_weights(self) -> dict | None:
        """The full weights where the model holds only a shard (to process 0; the others get {}), else None.
        Every process must call it."""
        return None

    def checkpoint_state(self) -> tuple[dict | None, dict]:
        """(gathered_weights, optimizer state keyed by parameter name): the format of every strategy, so a run
        resumes with any number of processes. Every process must call it."""
        return self.gathered_weights(), get_optimizer_state_dict(self.model, self.optimizer)

    def load_optimizer_state(self, state: dict) -> None:
        """A checkpoint's optimizer state, whichever strategy wrote it."""
        if all(isinstance(key, int) for key in state["state"]):  # an older checkpoint: optimizer.state_dict()
            self.optimizer.load_state_dict(state)
            return
        self._load_named_optimizer_state(state)

    def _load_named_optimizer_state(self, state: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


def tie(model: torch.nn.Module, weights: dict) -> dict:
    """Gathered tied weights (embeddings and LM head) come back as separate copies: make each alias the first
    name's tensor again, so that save_pretrained stores it once, as an unsharded model's would be."""
    first_name: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(id(parameter), name)
        if weights and first != name:
            weights[name] = weights[first]
    return weights
