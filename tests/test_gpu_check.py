"""benchmarks/gpu_check.py: the real-size models are what the README says, and its whole path (model building, our
run, TRL's run, the report) works end to end in its CPU smoke mode. Kept short: tiny models, 2 steps, one
subprocess with a time limit (about half a minute on 2 cores)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen3ForCausalLM

from gpu_check import parse_args
from gpu_check_models import REAL, build_tokenizer, qwen3_config
from opdplus.rollout import render_prompt
from opdplus.tasks import get_task

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_real_sizes_are_qwen3_0_6b_and_1_7b():
    tokenizer = build_tokenizer(REAL.vocab)
    assert len(tokenizer) == 151_936
    assert tokenizer.decode([151_935]) == "<|id:151935|>"  # every id a random model can sample has text
    prompt = render_prompt(tokenizer, get_task("arith").examples("train", 1, seed=0)[0].prompt)
    assert tokenizer.unk_token_id not in tokenizer(prompt, add_special_tokens=False)["input_ids"]
    counts = {}
    for role, shape in (("student", REAL.student), ("teacher", REAL.teacher)):
        with torch.device("meta"):  # shapes only, no memory
            model = Qwen3ForCausalLM(qwen3_config(shape, tokenizer, REAL.vocab))
        assert model.config.tie_word_embeddings and model.config.vocab_size == 151_936
        counts[role] = sum(parameter.numel() for parameter in model.parameters())
    # Qwen3-0.6B: 0.6B parameters, 0.44B without embeddings; Qwen3-1.7B: 1.7B, 1.4B without embeddings
    assert counts["student"] == pytest.approx(0.596e9, rel=0.01)
    assert counts["student"] - 151_936 * 1024 == pytest.approx(0.44e9, rel=0.01)
    assert counts["teacher"] == pytest.approx(1.72e9, rel=0.01)
    assert counts["teacher"] - 151_936 * 2048 == pytest.approx(1.41e9, rel=0.01)


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        parse_args(["--steps", "1"])  # one step would be all warm-up
    args = parse_args(["--smoke"])
    assert (args.steps, args.max_new_tokens) == (2, 16)


def test_smoke_run_end_to_end(tmp_path):
    completed = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--results-dir", str(tmp_path)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    last_line = completed.stdout.strip().splitlines()[-1]
    assert last_line.startswith("ratio=")
    result = json.loads((tmp_path / "gpu_check_smoke.json").read_text())
    assert result["ratio"] == pytest.approx(float(last_line.removeprefix("ratio=")), abs=1e-4)
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert result["ratio"] == pytest.approx(result["ours_tokens_per_s"] / result["trl_tokens_per_s"], rel=1e-3)
    assert "138,176 parameters" in result["models"]  # the tiny Qwen3 student was built and used
    for side in ("ours", "trl"):
        assert 0 < result[f"{side}_mean_response_tokens"] <= 16
        assert result[f"{side}_generation_tokens_per_s"] >= result[f"{side}_tokens_per_s"] > 0
    breakdown = result["ours_step_breakdown_s"]
    parts = ("generate", "teacher", "student_forward", "backward", "optimizer")
    assert set(parts) <= breakdown.keys()
    assert 0 < sum(breakdown[part] for part in parts) <= breakdown["step"]
    assert set(result["sampler_trainer_mismatch"]) == {"rollout_logprob_diff_mean", "rollout_logprob_diff_max",
                                                        "rollout_kl", "rollout_ratio_truncated_fraction"}
    for name, value in result["sampler_trainer_mismatch"].items():  # a KL estimate may dip below 0
        assert value == "n/a" or (math.isfinite(value) and (value >= 0 or name == "rollout_kl"))
    logs = {path.name for path in (tmp_path / "gpu_check_smoke_logs").iterdir()}
    assert {"build.log", f"ours-{result['ours_rollouts'].split()[0]}.log",
            f"trl-{result['trl_generation'].split()[0]}.log"} <= logs
