"""Several processes: two gloo processes, each updating on its share of a batch, reach the same parameters as
one process updating on the whole batch, data parallel (DDP: gradients summed) and sharded (FSDP2: gradients
reduce-scattered as sums, weights gathered for sampling and checkpoints). The loss is divided by the global
token count, so neither the split nor the micro-batching changes the update.

The updates use SGD: Adam's first step is sign(gradient) * lr, blind to the gradient's scale. The `accelerate
launch` tests run the shipped configs end to end."""

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opdplus.cli import exit_now
from opdplus.config import TrainConfig
from opdplus.objective import Objective
from opdplus.parallel import SingleProcess, make_strategy
from opdplus.rollout import Rollouts
from opdplus.run import lr_lambda
from opdplus.teachers.distribution import TopKDistribution
from opdplus.models import resolve_model
from opdplus.objective.spans import SpanScores, sum_by_span
from opdplus.trainer import optimize

ROOT = Path(__file__).resolve().parents[1]
ROWS, PROMPT, RESPONSE = 8, 5, 7


def batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 60, (ROWS, PROMPT + RESPONSE), generator=generator)
    lengths = torch.randint(2, RESPONSE + 1, (ROWS,), generator=generator)
    mask = torch.arange(RESPONSE)[None] < lengths[:, None]  # responses of different lengths
    attention_mask = torch.cat([torch.ones(ROWS, PROMPT, dtype=torch.long), mask.long()], 1)
    teacher_logprobs = -torch.rand(ROWS, RESPONSE, generator=generator) * 4
    return input_ids, attention_mask, mask, teacher_logprobs


SPLIT = (slice(0, 5), slice(5, 8))  # uneven shares: under FSDP the processes run different numbers of micro-batches


def span_scores(teacher_logprobs, mask):
    """SpanScores of batch(): even rows re-tokenized into spans of two tokens, odd rows token-level (causal)."""
    positions = torch.arange(RESPONSE).expand(ROWS, RESPONSE)
    pairs = torch.arange(ROWS)[:, None] % 2 == 0  # [N, 1]
    span_ids = torch.where(pairs, positions // 2, positions)  # [N, T]
    logprobs = sum_by_span(teacher_logprobs, span_ids, mask, RESPONSE)  # [N, K = T]
    span_mask = torch.zeros(ROWS, RESPONSE, dtype=torch.long).scatter_add_(1, span_ids, mask.long()) > 0
    return SpanScores(logprobs, span_ids, span_mask, ~pairs[:, 0])


def one_update(model_dir, rows, config, sharded=False, poison=None, spans=False):
    """Parameters after update() on batch()[rows], and the logged metrics. sharded: True (FSDP), False, or
    "zero2" / "zero3" (DeepSpeed). poison: None, no NaN anywhere; True, a NaN teacher log-prob in this process's
    first row; False, one in another process's: the update is skipped."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    strategy = make_strategy({False: None, True: "fsdp"}.get(sharded, "deepspeed"),
                             stage=int(sharded[-1]) if isinstance(sharded, str) else None)
    strategy.wrap(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    strategy.attach_optimizer(optimizer, config.max_grad_norm)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    input_ids, attention_mask, mask, teacher_logprobs = (t[rows] for t in batch())
    if poison:
        teacher_logprobs = teacher_logprobs.clone()
        teacher_logprobs[0, 0] = math.nan
    rollouts = Rollouts(input_ids=input_ids, attention_mask=attention_mask, prompt_length=PROMPT, response_mask=mask,
                        completions=[""] * len(input_ids), prompt_index=list(range(len(input_ids))))
    objective = Objective(config.divergence, config.estimator, gamma=config.gamma,
                          log_ratio_clip=config.log_ratio_clip, clip_eps=config.clip_eps,
                          reward_weight=config.reward_weight)
    extra = {}
    if objective.needs_distribution:  # a teacher's top-k: random, the same rows as the batch
        generator = torch.Generator().manual_seed(1)
        logprobs = torch.log_softmax(3 * torch.randn(ROWS, RESPONSE, model.config.vocab_size, generator=generator), -1)
        top = logprobs.topk(objective.top_k)
        extra["teacher_distribution"] = TopKDistribution(top.indices[rows], top.values[rows])
    if config.reward_weight:  # rewards 0/1; samples of one prompt stay in one process (rows 0 | 1 2 | 3 4 | 5 6 | 7)
        global_rows = range(ROWS)[rows]
        extra["sequence_advantages"] = objective.sequence_advantages(
            [float(row % 3 == 0) for row in global_rows], [(row + 1) // 2 for row in global_rows], "cpu")
    if spans:  # the whole batch's spans, then this process's rows
        _, _, full_mask, full_teacher = batch()
        teacher = span_scores(full_teacher, full_mask).rows(rows)
    else:
        teacher = teacher_logprobs
    update = optimize(strategy, optimizer, scheduler, objective, rollouts, teacher,
                      ppo_epochs=config.ppo_epochs, micro_batch_size=config.micro_batch_size, **extra)
    assert bool(update.bad_rows) == (poison is not None)
    weights = (strategy.checkpoint_state()[0] if sharded else None) or dict(model.named_parameters())
    return {name: tensor.detach().clone() for name, tensor in weights.items()}, update.metrics


def worker(rank, world_size, port, model_dir, out_dir, config, sharded, poisoned_rank=None, spans=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        poison = None if poisoned_rank is None else rank == poisoned_rank
        parameters, metrics = one_update(model_dir, SPLIT[rank], config, sharded, poison, spans)
        if rank == 0 or sharded in (False, "zero2"):  # sharded: the full weights are gathered to process 0 only
            torch.save((parameters, metrics), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_now()  # as a launched `opdplus train` ends (see there)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def has_deepspeed():
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


NEEDS_DEEPSPEED = pytest.mark.skipif(not has_deepspeed(), reason="deepspeed is not installed (pip install deepspeed)")


@pytest.mark.parametrize("sharded", [False, True, pytest.param("zero2", marks=NEEDS_DEEPSPEED),
                                     pytest.param("zero3", marks=NEEDS_DEEPSPEED)],
                         ids=["ddp", "fsdp", "zero2", "zero3"])
def test_two_processes_match_one_process_on_the_combined_batch(models, tmp_path, sharded):
    # fkl, two PPO epochs, micro-batches and clipping: every place where a count or a mean could go wrong
    config = TrainConfig(divergence="fkl", lr=0.1, ppo_epochs=2, clip_eps=0.2, micro_batch_size=3, max_grad_norm=1.0)
    mp.spawn(worker, args=(2, free_port(), models["student"], str(tmp_path), config, sharded), nprocs=2, join=True)
    single, single_metrics = one_update(models["student"], slice(0, ROWS), config)
    start = {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(models["student"]).named_parameters()}
    for rank in range(1 if sharded is True or sharded == "zero3" else 2):
        distributed, metrics = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert any(not torch.equal(distributed[name], start[name]) for name in start)  # it did move
        for name in single:
            torch.testing.assert_close(distributed[name], single[name], rtol=0, atol=1e-5)
        assert metrics["grad_norm"] == pytest.approx(single_metrics["grad_norm"], rel=1e-5)
        assert metrics["grad_norm"] > 1.0  # so the clipping acted


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp"])
def test_top_k_with_an_outcome_reward_matches_one_process(models, tmp_path, sharded):
    # the per-position divergences run through the wrapped student's chunked head; the reward's leave-one-out
    # baseline stays within each process's prompts
    config = TrainConfig(divergence="jsd", estimator="topk:4", reward_weight=0.5, gamma=1.0, lr=0.1, ppo_epochs=2,
                         clip_eps=0.2, micro_batch_size=3)
    mp.spawn(worker, args=(2, free_port(), models["student"], str(tmp_path), config, sharded), nprocs=2, join=True)
    single, single_metrics = one_update(models["student"], slice(0, ROWS), config)
    distributed, metrics = torch.load(tmp_path / "rank0.pt", weights_only=True)
    for name in single:
        torch.testing.assert_close(distributed[name], single[name], rtol=0, atol=1e-5)
    assert metrics["grad_norm"] == pytest.approx(single_metrics["grad_norm"], rel=1e-5)  # metrics are per process
    assert 0 < single_metrics["distillation_share"] < 1  # both the divergence and the reward moved it


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp"])
def test_span_level_scores_match_one_process(models, tmp_path, sharded):
    # a re-tokenizing teacher's SpanScores (two-token spans with the two-sided credit, and token-level rows with
    # the causal one, in one batch) split over processes: the update is the one-process update
    config = TrainConfig(divergence="jsd", gamma=1.0, lr=0.1, ppo_epochs=2, clip_eps=0.2, micro_batch_size=3)
    mp.spawn(worker, args=(2, free_port(), models["student"], str(tmp_path), config, sharded, None, True), nprocs=2,
             join=True)
    single, single_metrics = one_update(models["student"], slice(0, ROWS), config, spans=True)
    token_level, _ = one_update(models["student"], slice(0, ROWS), config)
    distributed, metrics = torch.load(tmp_path / "rank0.pt", weights_only=True)
    for name in single:
        torch.testing.assert_close(distributed[name], single[name], rtol=0, atol=1e-5)
    assert metrics["grad_norm"] == pytest.approx(single_metrics["grad_norm"], rel=1e-5)
    assert max(float((single[name] - token_level[name]).abs().max()) for name in single) > 1e-4  # spans count


@pytest.mark.parametrize("sharded", [False, True, pytest.param("zero2", marks=NEEDS_DEEPSPEED),
                                     pytest.param("zero3", marks=NEEDS_DEEPSPEED)],
                         ids=["ddp", "fsdp", "zero2", "zero3"])
def test_non_finite_values_on_one_process_skip_the_update_on_all(models, tmp_path, sharded):
    # process 1 sees a NaN and runs fewer real micro-batches than process 0: nobody hangs, nobody updates
    config = TrainConfig(divergence="fkl", lr=0.1, micro_batch_size=3, max_grad_norm=1.0)
    mp.spawn(worker, args=(2, free_port(), models["student"], str(tmp_path), config, sharded, 1), nprocs=2,
             join=True)
    start = {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(models["student"]).named_parameters()}
    for rank in range(2 if sharded in (False, "zero2") else 1):
        parameters, _ = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name in start:
            assert torch.equal(parameters[name], start[name]), name


def launch(config_file, out, *args, env=None):
    """`accelerate launch` of `opdplus train` with a shipped config, 2 processes on CPU; returns the process."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / config_file), "--num_processes", "2", "--main_process_port",
               str(free_port()), "-m", "opdplus.cli", "train", "--task", "arith", "--student", "tiny:arith-student",
               "--teacher", "tiny:arith-teacher", "--prompts-per-step", "3", "--samples-per-prompt", "2",
               "--micro-batch-size", "4", "--eval-every", "2", "--eval-examples", "8", "--save-every", "1",
               "--no-progress", "--out", str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_fsdp_launch_config_trains_like_ddp_and_resumes_in_one_process(tmp_path):
    runs = {}
    for name in ("ddp", "fsdp"):
        result = launch(f"{name}.yaml", tmp_path / name, "--steps", "2")
        assert result.returncode == 0, result.stderr[-3000:]
        shards = re.search(r"FSDP2 over 2 processes: \d+ units, ([\d,]+) of ([\d,]+) parameters", result.stdout)
        assert (shards is not None) == (name == "fsdp")
        if shards:  # it really shards: process 0 holds about half of the student
            local, total = (int(number.replace(",", "")) for number in shards.groups())
            assert 0.4 * total < local < 0.6 * total
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    # the same samples (each process draws its share with its own seed) and the same updates, step by step
    assert [row["step"] for row in runs["fsdp"]] == [0, 1, 2]
    for ddp, fsdp in zip(runs["ddp"], runs["fsdp"]):
        for key in ("greedy_accuracy", "sample_accuracy", "response_length", "num_tokens"):
            assert fsdp.get(key) == ddp.get(key), key
        for key in ("loss", "reverse_kl", "grad_norm"):
            assert fsdp.get(key, 0.0) == pytest.approx(ddp.get(key, 0.0), rel=1e-4, abs=1e-6), key
    ddp_final = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    fsdp_final = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    assert ddp_final.keys() == fsdp_final.keys()
    for name in ddp_final:
        torch.testing.assert_close(fsdp_final[name], ddp_final[name], rtol=0, atol=1e-5)
    # the FSDP checkpoint holds full weights and the optimizer state by parameter name, as one process writes
    # them: a single process resumes it
    state = torch.load(tmp_path / "fsdp" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert set(state["state"]) == set(fsdp_final) - {"lm_head.weight"}  # tied to the embeddings
    from opdplus.cli import main

    assert main(["train", "--task", "arith", "--student", "tiny:arith-student", "--teacher", "tiny:arith-teacher",
                 "--prompts-per-step", "3", "--samples-per-prompt", "2", "--eval-every", "0", "--steps", "3",
                 "--no-progress", "--out", str(tmp_path / "fsdp"), "--resume"]) == 0
    assert json.loads((tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_lora_under_fsdp_trains_like_ddp(tmp_path):
    # frozen base weights and trainable adapters in the same FSDP units; final/ merges the gathered adapters
    finals = {}
    for name in ("ddp", "fsdp"):
        result = launch(f"{name}.yaml", tmp_path / name, "--steps", "2", "--lora-r", "4", "--lr", "1e-2")
        assert result.returncode == 0, result.stderr[-3000:]
        assert (tmp_path / name / "checkpoint-2" / "adapter_model.safetensors").is_file()
        finals[name] = load_file(tmp_path / name / "final" / "model.safetensors")
    start = load_file(Path(resolve_model("tiny:arith-student")) / "model.safetensors")
    assert finals["fsdp"].keys() == finals["ddp"].keys() == start.keys()
    assert any(not torch.equal(finals["fsdp"][name], start[name]) for name in start)  # the merged adapters moved it
    adapters = {name: load_file(tmp_path / name / "checkpoint-2" / "adapter_model.safetensors") for name in finals}
    for ours, theirs in [(finals["fsdp"], finals["ddp"]), (adapters["fsdp"], adapters["ddp"])]:
        # Adam's first steps divide by |gradient|, so an adapter element whose gradient is near zero turns the
        # rounding differences of the two reductions into up to ~3e-4 (seen); a real fault (averaged gradients,
        # lost adapters) moves most elements by a step's size, lr = 1e-2
        differences = torch.cat([(ours[key] - theirs[key]).abs().flatten() for key in theirs])
        assert float(differences.max()) < 1e-3
        assert float((differences > 1e-5).float().mean()) < 0.01


@NEEDS_DEEPSPEED
def test_deepspeed_launch_configs_train_like_ddp(tmp_path):
    runs, finals = {}, {}
    for name in ("ddp", "deepspeed-zero2", "deepspeed-zero3"):
        result = launch(f"{name}.yaml", tmp_path / name, "--steps", "2", env={"DS_ACCELERATOR": "cpu"})
        assert result.returncode == 0, result.stderr[-3000:]
        if name != "ddp":
            assert f"DeepSpeed ZeRO-{name[-1]} over 2 processes" in result.stdout
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        finals[name] = load_file(tmp_path / name / "final" / "model.safetensors")
    for name in ("deepspeed-zero2", "deepspeed-zero3"):
        assert [row["step"] for row in runs[name]] == [0, 1, 2]
        for ddp, ours in zip(runs["ddp"], runs[name]):
            for key in ("greedy_accuracy", "sample_accuracy", "response_length", "num_tokens"):
                assert ours.get(key) == ddp.get(key), key
            for key in ("loss", "reverse_kl", "grad_norm"):
                assert ours.get(key, 0.0) == pytest.approx(ddp.get(key, 0.0), rel=1e-4, abs=1e-6), key
        assert finals[name].keys() == finals["ddp"].keys()
        for key in finals["ddp"]:
            torch.testing.assert_close(finals[name][key], finals["ddp"][key], rtol=0, atol=5e-5)
        # AdamW's state by parameter name, as DDP (and one process) write it
        ours, ddp = (torch.load(tmp_path / run / "checkpoint-2" / "optimizer.pt", weights_only=True)
                     for run in (name, "ddp"))
        assert ours["state"].keys() == ddp["state"].keys()
        for key, values in ddp["state"].items():
            for field in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(ours["state"][key][field], values[field], rtol=0, atol=1e-6)
    # resuming: ZeRO-2 continues as DDP does; ZeRO-3 refuses with one line and leaves the run as it was
    for name in ("ddp", "deepspeed-zero2"):
        result = launch(f"{name}.yaml", tmp_path / name, "--steps", "3", "--resume", env={"DS_ACCELERATOR": "cpu"})
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in runs["deepspeed-zero2"]] == [0, 1, 2, 3]
    for key in ("loss", "reverse_kl", "grad_norm"):
        assert runs["deepspeed-zero2"][3][key] == pytest.approx(runs["ddp"][3][key], rel=1e-4), key
    before = (tmp_path / "deepspeed-zero3" / "metrics.jsonl").read_text()
    result = launch("deepspeed-zero3.yaml", tmp_path / "deepspeed-zero3", "--steps", "3", "--resume",
                    env={"DS_ACCELERATOR": "cpu"})
    assert result.returncode != 0 and "--resume under DeepSpeed ZeRO-3 is not supported yet" in result.stderr
    assert (tmp_path / "deepspeed-zero3" / "metrics.jsonl").read_text() == before
    result = launch("ddp.yaml", tmp_path / "deepspeed-zero3", "--steps", "3", "--resume")  # its checkpoint, under DDP
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads((tmp_path / "deepspeed-zero3" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "reverse_kl", "grad_norm"):
        assert resumed[key] == pytest.approx(runs["ddp"][3][key], rel=1e-4), key


def test_fsdp1_and_deepspeed_stage1_launch_configs_are_refused(models, tmp_path, monkeypatch, capsys):
    from opdplus.cli import main

    for variables, expected in (({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"},
                                 "ZeRO stage 1"),
                                ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"},
                                 "offload_param_device: cpu"),
                                ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1")):
        for variable, value in variables.items():
            monkeypatch.setenv(variable, value)
        out = tmp_path / expected.split()[-1]
        assert main(["train", "--student", models["student"], "--teacher", models["teacher"], "--out", str(out),
                     "--steps", "1"]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and expected in error[0] and not out.exists()
        for variable in variables:
            monkeypatch.delenv(variable)


def test_optimizer_state_by_parameter_name_and_older_checkpoints_load(models):
    # checkpoints now key AdamW's state by parameter name (the same for 1 process, DDP and FSDP); a checkpoint
    # written before, with optimizer.state_dict()'s integer keys, still resumes
    model = AutoModelForCausalLM.from_pretrained(models["student"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    optimizer.step()
    expected = optimizer.state_dict()["state"]
    strategy = SingleProcess()
    strategy.wrap(model)
    strategy.attach_optimizer(optimizer, None)
    _, by_name = strategy.checkpoint_state()
    assert set(by_name["state"]) == {name for name, _ in model.named_parameters()}
    for state in (by_name, optimizer.state_dict()):
        fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)
        strategy.attach_optimizer(fresh, None)
        strategy.load_optimizer_state(state)
        for index, values in fresh.state_dict()["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(values[key], expected[index][key], rtol=0, atol=0)


def test_an_old_extension_lock_is_reported_and_kept(tmp_path, monkeypatch, capsys):
    """A lock left by a killed DeepSpeed build hangs every later ZeRO start: say so at start, delete nothing."""
    from opdplus.parallel.deepspeed import warn_stale_extension_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir()
        lock.touch()
    os.utime(old, (0, 0))
    assert warn_stale_extension_locks() == [old]
    assert f"{old} is " in capsys.readouterr().err
    assert old.exists() and fresh.exists()
