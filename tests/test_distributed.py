"""Data parallelism: two gloo processes, each updating on half of a batch, reach the same parameters as one
process updating on the whole batch (the loss is divided by the global token count and gradients are summed)."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from opdplus.config import TrainConfig
from opdplus.trainer import lr_lambda, update

ROWS, PROMPT, RESPONSE = 8, 5, 7


def batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 60, (ROWS, PROMPT + RESPONSE), generator=generator)
    lengths = torch.randint(2, RESPONSE + 1, (ROWS,), generator=generator)
    mask = torch.arange(RESPONSE)[None] < lengths[:, None]  # responses of different lengths
    attention_mask = torch.cat([torch.ones(ROWS, PROMPT, dtype=torch.long), mask.long()], 1)
    teacher_logprobs = -torch.rand(ROWS, RESPONSE, generator=generator) * 4
    return input_ids, attention_mask, mask, teacher_logprobs


def one_update(model_dir, rows, config):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    input_ids, attention_mask, mask, teacher_logprobs = (t[rows] for t in batch())
    update(model, optimizer, scheduler, config, input_ids, attention_mask, PROMPT, mask, teacher_logprobs)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def worker(rank, world_size, port, model_dir, out_dir, config):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        share = ROWS // world_size
        parameters = one_update(model_dir, slice(rank * share, (rank + 1) * share), config)
        torch.save(parameters, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_match_one_process_on_the_combined_batch(models, tmp_path):
    # fkl, two PPO epochs and micro-batches: every place where a count or a mean could go wrong
    config = TrainConfig(divergence="fkl", lr=1e-2, ppo_epochs=2, clip_eps=0.2, micro_batch_size=3,
                         max_grad_norm=None)
    mp.spawn(worker, args=(2, free_port(), models["student"], str(tmp_path), config), nprocs=2, join=True)
    single = one_update(models["student"], slice(0, ROWS), config)
    start = {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(models["student"]).named_parameters()}
    for rank in range(2):
        distributed = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert any(not torch.equal(distributed[name], start[name]) for name in start)  # it did move
        for name in single:
            torch.testing.assert_close(distributed[name], single[name], rtol=0, atol=1e-5)


def test_a_sharding_launch_config_is_refused_not_silently_replicated(models, tmp_path, monkeypatch, capsys):
    from opdplus.cli import main

    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        monkeypatch.setenv(variable, "true")
        out = tmp_path / name
        assert main(["train", "--student", models["student"], "--teacher", models["teacher"], "--out", str(out),
                     "--steps", "1"]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and f"asked for {name}" in error[0] and not out.exists()
        monkeypatch.delenv(variable)
