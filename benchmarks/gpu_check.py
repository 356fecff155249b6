"""GPU check: opdplus at real model sizes on one GPU, beside TRL's DistillationTrainer on the same models and batch.

Random-initialised Qwen3-style models with the shapes of Qwen3-0.6B (student) and Qwen3-1.7B (teacher),
vocabulary 151,936, made on the spot with a tokenizer built in code (nothing is downloaded). Our trainer runs OPD+
with the jsd divergence in bfloat16 with vLLM rollouts (the hf backend, with a warning, when vLLM is missing or
fails); TRL's DistillationTrainer runs the same steps with the same generation backend. Prints rollout tokens/s,
our step time breakdown, each run's peak GPU memory, the sampler-trainer log-prob mismatch our trainer logs, and
ends with `ratio=` rollout tokens/s ours / TRL (as benchmarks/vs_trl.py measures it, first step left out).

Each step of the pipeline runs in its own process (model building, our run, TRL's run): each peak memory is that
run's own, vLLM engines never outlive their run, and a crash is reported with the tail of that run's log.
Random models almost never sample EOS, so every response is max_new_tokens long: a speed check, not a quality one.

    benchmarks/gpu_check.sh                       # one GPU, about 5-8 minutes
    python benchmarks/gpu_check.py --smoke        # tiny models on the CPU, the same code path (about a minute)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(offline, "1")  # everything is local

HERE = Path(__file__).resolve().parent
GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, CPU, float32, 2 steps: tests the path")
    parser.add_argument("--steps", type=int, help="optimizer steps per trainer, the first warms up "
                        "(default 6; smoke 2)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (default 8)")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (default 4)")
    parser.add_argument("--max-new-tokens", type=int, help="response length (default 256; smoke 16)")
    parser.add_argument("--backend", choices=("auto", "vllm", "hf"), default="auto",
                        help="our rollouts: vllm, hf, or auto (vllm when importable)")
    parser.add_argument("--vllm-memory", type=float, default=0.3,
                        help="GPU memory fraction of each colocated vLLM engine (TRL's default, 0.3)")
    parser.add_argument("--phase-timeout", type=int, default=420, help="seconds allowed per run (default 420)")
    parser.add_argument("--results-dir", default=str(HERE / "results"), help="where the JSON result goes")
    parser.add_argument("--phase", choices=("build", "ours", "trl"), help=argparse.SUPPRESS)  # one run, internal
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.smoke else 6)
    args.max_new_tokens = args.max_new_tokens or (16 if args.smoke else 256)
    for name in ("prompts", "samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.steps < 2:
        parser.error(f"--steps must be at least 2 (the first warms up), got {args.steps}")
    if not 0.0 < args.vllm_memory < 1.0:
        parser.error(f"--vllm-memory must be in (0, 1), got {args.vllm_memory}")
    return args


# ---- one run in this process (--phase) ---------------------------------------------------------------------------

def run_phase(phase: str, plan_path: str) -> None:
    """Run one step of the pipeline from the JSON plan, and write its result beside the plan."""
    import torch

    from gpu_check_runs import Plan, run_ours, run_trl

    plan_data = json.loads(Path(plan_path).read_text())
    if phase == "build":
        from gpu_check_models import REAL, SMOKE, build_models

        sizes = SMOKE if plan_data["smoke"] else REAL
        result = build_models(Path(plan_data["root"]), sizes, device=plan_data["device"],
                              dtype=getattr(torch, plan_data["dtype"]))
        result["sizes"] = sizes.name
    else:
        plan = Plan(**plan_data)
        if plan.threads:
            torch.set_num_threads(plan.threads)
        result = (run_ours if phase == "ours" else run_trl)(plan)
    Path(plan_path).with_suffix(".result.json").write_text(json.dumps(result))


# ---- the whole check ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    result: dict | None  # None: the run failed
    seconds: float
    log: Path
    error: str = ""  # the last lines of the log when it failed


def launch(phase: str, plan: dict, work: Path, logs: Path, timeout: int, tag: str) -> Outcome:
    """Run one phase in a fresh Python process, its output in logs/<tag>.log."""
    plan_path = work / f"{tag}.json"
    plan_path.write_text(json.dumps(plan))
    log = logs / f"{tag}.log"
    started = time.perf_counter()
    print(f"[gpu_check] {tag} ... (log: {log})", flush=True)
    with log.open("w") as output:
        try:
            code = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--phase", phase,
                                   "--plan", str(plan_path)], stdout=output, stderr=subprocess.STDOUT,
                                  timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        except subprocess.TimeoutExpired:
            code = f"timed out after {timeout} s"
    seconds = time.perf_counter() - started
    result_path = plan_path.with_suffix(".result.json")
    if code == 0 and result_path.is_file():
        print(f"[gpu_check] {tag} done in {seconds:.0f} s", flush=True)
        return Outcome(json.loads(result_path.read_text()), seconds, log)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
    print(f"[gpu_check] {tag} FAILED ({code}) after {seconds:.0f} s; last lines of {log}:\n{tail}", flush=True)
    return Outcome(None, seconds, log, error=f"exit {code}: " + " | ".join(tail.splitlines()[-3:]))


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_with_fallback(phase: str, plan: dict, work: Path, logs: Path, timeout: int, notes: list[str]):
    """The run on its planned generation backend; when that is vLLM and it fails, once more on hf."""
    outcome = launch(phase, plan, work, logs, timeout, f"{phase}-{plan['generation']}")
    if outcome.result is None and plan["generation"] == "vllm":
        notes.append(f"{phase} with vLLM failed ({outcome.error}); rerun with hf generation")
        print(f"WARNING: {phase} with vLLM rollouts failed; running it again with hf generation", flush=True)
        plan = {**plan, "generation": "hf"}
        outcome = launch(phase, plan, work, logs, timeout, f"{phase}-hf")
    return outcome, plan["generation"]


def main() -> int:
    args = parse_args()
    if args.phase:
        run_phase(args.phase, args.plan)
        return 0
    if not args.smoke and not cuda_available():
        sys.exit("gpu_check: no CUDA device is visible; run it on a GPU machine, or pass --smoke for the CPU path")
    if importlib.util.find_spec("trl") is None:
        sys.exit("gpu_check: the comparison needs TRL in this environment (pip install 'trl>=1.16')")
    device, dtype = ("cpu", "float32") if args.smoke else ("cuda", "bfloat16")
    generation = args.backend
    if generation == "auto":
        generation = "vllm" if vllm_importable() else "hf"
        if generation == "hf":
            print("WARNING: vLLM is not importable here; rollouts use the hf backend (install opdplus[vllm] to "
                  "check vLLM)", flush=True)
    elif generation == "vllm" and not vllm_importable():
        sys.exit("gpu_check: --backend vllm needs vLLM in this environment (pip install 'opdplus[vllm]')")

    results_dir = Path(args.results_dir)
    name = "gpu_check_smoke" if args.smoke else "gpu_check"
    logs = results_dir / f"{name}_logs"
    logs.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        work = Path(work)
        built = launch("build", {"smoke": args.smoke, "root": str(work / "models"), "device": device,
                                 "dtype": dtype}, work, logs, args.phase_timeout, "build")
        if built.result is None:
            sys.exit(f"gpu_check: building the models failed: {built.error}")
        plan = dict(student=built.result["student"], teacher=built.result["teacher"], device=device, dtype=dtype,
                    generation=generation, prompts_per_step=args.prompts, samples_per_prompt=args.samples,
                    max_new_tokens=args.max_new_tokens, steps=args.steps, lr=1e-5, vllm_memory=args.vllm_memory,
                    threads=1 if args.smoke else None)  # one thread each on a small shared CPU, as vs_trl
        ours, ours_generation = run_with_fallback("ours", {**plan, "out": str(work / "ours")}, work, logs,
                                                  args.phase_timeout, notes)
        # TRL generates as our run finally did, so the ratio compares trainers, not generation engines
        theirs, trl_generation = run_with_fallback("trl", {**plan, "generation": ours_generation,
                                                           "out": str(work / "trl")}, work, logs,
                                                   args.phase_timeout, notes)
    wall = time.perf_counter() - started
    summary = summarise(args, built, ours, theirs, ours_generation, trl_generation, device, dtype, notes, wall)

    import common

    common.RESULTS = results_dir  # report() writes <RESULTS>/<name>.json
    ratio = summary.pop("ratio")
    common.report(name, ratio, "report", **summary)
    return 0 if ours.result is not None and theirs.result is not None else 1


def summarise(args, built: Outcome, ours: Outcome, theirs: Outcome, ours_generation: str, trl_generation: str,
              device: str, dtype: str, notes: list[str], wall: float) -> dict:
    """The reported numbers: vs_trl's throughput measure (first step left out) and our run's extras."""
    from vs_trl import Run, Throughput

    def throughput(outcome: Outcome) -> Throughput | None:
        if outcome.result is None:
            return None
        total = Throughput()
        total.add(Run(outcome.result["tokens"], outcome.result["seconds"], outcome.result["generate_seconds"]))
        return total

    def gib(outcome: Outcome):
        value = (outcome.result or {}).get("peak_memory_bytes")
        return "n/a (cpu)" if value is None else round(value / GIB, 2)

    mine, trl = throughput(ours), throughput(theirs)
    rows = args.prompts * args.samples
    summary = {
        "ratio": mine.tokens_per_second / trl.tokens_per_second if mine and trl else math.nan,
        "models": f"{built.result['sizes']}, random weights: student {built.result['student_parameters']:,} "
                  f"parameters, teacher {built.result['teacher_parameters']:,}",
        "device": device, "dtype": dtype,
        "batch": f"{args.prompts} prompts x {args.samples} samples = {rows} rollouts per step, "
                 f"max_new_tokens {args.max_new_tokens}, temperature 1, top_k 0, top_p 1",
        "steps": f"{args.steps} per trainer, the first left out as warm-up",
        "losses": "opdplus: OPD+ estimator, divergence jsd; TRL: generalized JSD (beta 0.5) over the full vocabulary",
        "ours_rollouts": ours_generation + ("" if ours_generation == "hf" else
                                            f" (colocated, gpu_memory_utilization {args.vllm_memory})"),
        "trl_generation": trl_generation + ("" if trl_generation == "hf" else
                                            f" (colocated, gpu_memory_utilization {args.vllm_memory})"),
    }
    for side, total, outcome in (("ours", mine, ours), ("trl", trl, theirs)):
        if total is None:
            summary[f"{side}_error"] = outcome.error
            continue
        summary[f"{side}_tokens_per_s"] = round(total.tokens_per_second, 1)  # rollout tokens / step seconds
        summary[f"{side}_generation_tokens_per_s"] = round(total.tokens / total.generate_seconds, 1)
        summary[f"{side}_mean_step_s"] = round(total.seconds / total.steps, 3)
        summary[f"{side}_mean_response_tokens"] = round(total.tokens / (total.steps * rows), 1)
        summary[f"{side}_peak_memory_gib"] = gib(outcome)  # includes a colocated vLLM engine's reservation
    if ours.result is not None:
        summary["ours_step_breakdown_s"] = {key: round(value, 4) for key, value in ours.result["breakdown_s"].items()}
        summary["sampler_trainer_mismatch"] = {key: value if isinstance(value, str) else round(value, 6)
                                               for key, value in ours.result["mismatch"].items()}
    summary["phase_seconds"] = {"build_models": round(built.seconds, 1), "ours": round(ours.seconds, 1),
                                "trl": round(theirs.seconds, 1)}
    summary["wall_s"] = round(wall, 1)
    summary["notes"] = notes + [
        "timings wait for the GPU at each timed boundary (torch.cuda.synchronize)" if device == "cuda" else
        "CPU run: one torch thread per trainer",
        "peak memory: torch.cuda.max_memory_allocated of each run's own process, vLLM's KV cache included",
    ]
    return summary


if __name__ == "__main__":
    sys.exit(main())
