"""DDP: every process holds the whole student and samples its share of the step's prompts; gradients are
summed over processes after the backward passes (each loss is already divided by the global token count)."""

from __future__ import annotations

import torch

from opdplus.parallel.base import SingleProcess


def broadcast_from_first_process(model: torch.nn.Module) -> None:
    """Every process starts from process 0's weights (as DDP's sync_module_states): fresh random parameters,
    such as LoRA's, would otherwise differ between processes."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)


class DataParallel(SingleProcess):
    def wrap(self, model: torch.nn.Module) -> None:
        broadcast_from_first_process(model)
        super().wrap(model)

    def reduce_gradients(self) -> None:
        for parameter in self.model.parameters():
            if parameter.requires_grad:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                torch.distributed.all_reduce(parameter.grad)
