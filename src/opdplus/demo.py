"""`opdplus demo`: every (task, divergence, estimator) arm from the same student init, seed and budget,
then a results table (Markdown + JSON) and one plot of accuracy and per-token reverse KL against step. Every
accuracy carries its 95 % Wilson interval over the held-out prompts: one seed and a few hundred prompts cannot
tell apart arms a few points apart, and the table says so instead of ranking them.

Arms run in parallel worker processes, one CPU thread each: tiny models do not use more than one core well.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from opdplus.config import TrainConfig
from opdplus.intervals import accuracy_interval, gap_closed, gap_closed_range, steps_to_close

# Same settings for every arm; --quick shortens the run for smoke tests.
DEMO_SETTINGS = dict(
    prompts_per_step=32,
    samples_per_prompt=4,
    steps=150,
    lr=1e-4,
    warmup_steps=10,
    max_grad_norm=1.0,
    log_ratio_clip=10.0,
    gamma=0.0,
    ppo_epochs=1,
    eval_every=25,
    eval_examples=300,
)
QUICK_SETTINGS = dict(steps=40, eval_every=10, eval_examples=200)
MILESTONE = 0.2  # the "steps to close 20 % of the gap" column


def arm_name(task: str, divergence: str, estimator: str) -> str:
    return f"{task}-{divergence.replace(':', '')}-{estimator.replace('+', 'plus').replace(':', '')}"


def _worker_init() -> None:
    import torch
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(1)
    transformers_logging.disable_progress_bar()


def _run_arm(config: TrainConfig) -> str:
    from opdplus.trainer import train

    train(config, progress=False)
    return config.out


def _teacher_accuracy(task_name: str, teacher: str, eval_examples: int) -> float:
    from opdplus.rollout.evaluation import evaluate
    from opdplus.tasks import get_task
    from opdplus.models import load_model_and_tokenizer

    task = get_task(task_name)
    teacher, tokenizer = load_model_and_tokenizer(teacher)
    return evaluate(teacher, tokenizer, task, task.examples("test", eval_examples, seed=0))["greedy_accuracy"]


def run_demo(out: Path, *, tasks: list[str], divergences: list[str], estimators: list[str], quick: bool, seed: int,
             workers: int, overrides: dict | None = None) -> dict:
    settings = {**DEMO_SETTINGS, **(QUICK_SETTINGS if quick else {}), **(overrides or {}), "seed": seed}
    configs = [  # --set student=... / teacher=... replace the built-in pair (e.g. teacher=tiny:arith-teacher-bpe)
        TrainConfig(task=task, **{"student": f"tiny:{task}-student", "teacher": f"tiny:{task}-teacher", **settings},
                    divergence=divergence, estimator=estimator, tensorboard=False, overwrite=True,
                    out=str(out / "arms" / arm_name(task, divergence, estimator))).validate()
        for task in tasks for divergence in divergences for estimator in estimators
    ]
    teachers = {config.task: config.teacher for config in configs}
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"opdplus demo: {len(configs)} arms ({', '.join(tasks)} x {', '.join(divergences)} x "
          f"{', '.join(estimators)}), {settings['steps']} steps each, {workers} at a time -> {out}", flush=True)
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
        teacher_jobs = {task: pool.submit(_teacher_accuracy, task, teachers[task], settings["eval_examples"])
                        for task in tasks}
        jobs = [(config, pool.submit(_run_arm, config)) for config in configs]
        for done, (config, job) in enumerate(jobs, 1):
            job.result()
            print(f"  [{done}/{len(jobs)}] {Path(config.out).name} done after {time.perf_counter() - started:.0f} s",
                  flush=True)
        teacher_accuracy = {task: job.result() for task, job in teacher_jobs.items()}

    arms = [summarize_arm(config, teacher_accuracy[config.task]) for config in configs]
    results = {
        "settings": {**settings, "tasks": tasks, "divergences": divergences, "estimators": estimators,
                     "quick": quick, "workers": workers, "wall_seconds": round(time.perf_counter() - started, 1),
                     "command": "opdplus demo" + (" --quick" if quick else "") + f" --seed {seed}"},
        "arms": arms,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    plot_curves(out / "curves.png", configs, arms)
    print(markdown_table(results))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'curves.png'}")
    return results


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarize_arm(config: TrainConfig, teacher_accuracy: float) -> dict:
    """One row of the table: accuracies with their Wilson intervals over the `eval_examples` held-out prompts (the
    teacher's on the same prompts), the gap closed with its range, and the first step that closes MILESTONE."""
    records = read_metrics(Path(config.out))
    evals = [(r["step"], r["greedy_accuracy"]) for r in records if "greedy_accuracy" in r]
    prompts = config.eval_examples
    divergence_curve = [r["reverse_kl"] for r in records if "reverse_kl" in r]
    window = max(1, len(divergence_curve) // 10)  # per-step estimates are noisy: average the first / last 10 %
    start_divergence = sum(divergence_curve[:window]) / window
    final_divergence = sum(divergence_curve[-window:]) / window
    start_accuracy, final_accuracy = evals[0][1], evals[-1][1]
    start_interval, final_interval = (accuracy_interval(start_accuracy, prompts),
                                      accuracy_interval(final_accuracy, prompts))
    closed_range = gap_closed_range(final_interval, start_interval, teacher_accuracy)
    return {
        "task": config.task,
        "divergence": config.divergence,
        "estimator": config.estimator,
        "teacher_accuracy": teacher_accuracy,
        "start_accuracy": start_accuracy,
        "final_accuracy": final_accuracy,
        "best_accuracy": max(accuracy for _, accuracy in evals),
        "eval_examples": prompts,
        "teacher_interval": list(accuracy_interval(teacher_accuracy, prompts)),
        "start_interval": list(start_interval),
        "final_interval": list(final_interval),
        "gap_closed": gap_closed(final_accuracy, start_accuracy, teacher_accuracy),
        "gap_closed_range": list(closed_range) if closed_range else None,
        "steps_to_close_20pct": steps_to_close(evals, start_accuracy, teacher_accuracy, MILESTONE),
        "accuracy_curve": [{"step": step, "accuracy": accuracy, "interval": list(accuracy_interval(accuracy, prompts))}
                           for step, accuracy in evals],
        "start_divergence": start_divergence,
        "final_divergence": final_divergence,
        "collapsed": final_accuracy <= 0.5 * start_accuracy and final_divergence > start_divergence,
        "seed": config.seed,
        "steps": config.steps,
        "run_dir": config.out,
    }


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _accuracy_cell(accuracy: float, interval: list[float]) -> str:
    return f"{_percent(accuracy)} [{_percent(interval[0])}, {_percent(interval[1])}]"


def _gap_cell(arm: dict) -> str:
    if arm["gap_closed"] is None:
        return "n/a"
    low_high = arm["gap_closed_range"]
    spread = f" [{100 * low_high[0]:.0f}, {100 * low_high[1]:.0f}]" if low_high else ""
    return f"{100 * arm['gap_closed']:.0f} %{spread}"


def markdown_table(results: dict) -> str:
    lines = [
        "| task | divergence | estimator | teacher acc % | start acc % [95 % CI] | final acc % [95 % CI] | "
        f"best acc % | gap closed [range] | steps to close {100 * MILESTONE:.0f} % | per-token rKL start → final | "
        "collapsed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in results["arms"]:
        milestone = arm["steps_to_close_20pct"]
        lines.append(
            f"| {arm['task']} | {arm['divergence']} | {arm['estimator']} | {_percent(arm['teacher_accuracy'])} | "
            f"{_accuracy_cell(arm['start_accuracy'], arm['start_interval'])} | "
            f"{_accuracy_cell(arm['final_accuracy'], arm['final_interval'])} | {_percent(arm['best_accuracy'])} | "
            f"{_gap_cell(arm)} | {milestone if milestone is not None else 'not reached'} | "
            f"{arm['start_divergence']:.3f} → {arm['final_divergence']:.3f} | {'yes' if arm['collapsed'] else 'no'} |"
        )
    settings = results["settings"]
    lines.append("")
    lines.append(f"`{settings['command']}`: {settings['steps']} steps x {settings['prompts_per_step']} prompts x "
                 f"{settings['samples_per_prompt']} samples, lr {settings['lr']}, log-ratio clip "
                 f"{settings['log_ratio_clip']}, accuracy = greedy on {settings['eval_examples']} held-out prompts "
                 f"(the same prompts at every evaluation and for the teacher), {settings['wall_seconds']} s wall.")
    lines.append("")
    lines.append("95 % CI: Wilson score interval (z = 1.96) over the held-out prompts, one seed. Gap closed = "
                 "(final - start) / (teacher - start); its range takes every start and final accuracy inside their "
                 "two intervals, the teacher's accuracy treated as exact (conservative: start and final are measured "
                 f"on the same prompts). Steps to close {100 * MILESTONE:.0f} %: the first evaluated step whose "
                 f"accuracy closes at least {100 * MILESTONE:.0f} % of the gap (point estimates, evaluated every "
                 f"{settings['eval_every']} steps), or \"not reached\".")
    return "\n".join(lines) + "\n"


ESTIMATOR_STYLES = {"opd+": "-", "opd": "--", "dense": "-."}  # anything else (topk:K): dotted


def plot_curves(path: Path, configs: list[TrainConfig], arms: list[dict]) -> None:
    """Accuracy with its 95 % Wilson band (left) and per-token reverse KL (right), one row per task."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(arm["task"] for arm in arms))
    figure, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.6 * len(tasks)), squeeze=False)
    colors = {}
    for config, arm in zip(configs, arms):
        row = tasks.index(arm["task"])
        records = read_metrics(Path(config.out))
        color = colors.setdefault(arm["divergence"], f"C{len(colors)}")
        style = ESTIMATOR_STYLES.get(arm["estimator"], ":")
        label = f"{arm['divergence']} {arm['estimator']}"
        curve = arm["accuracy_curve"]
        steps = [point["step"] for point in curve]
        axes[row][0].plot(steps, [point["accuracy"] for point in curve], style, color=color, label=label, marker="o",
                          markersize=2)
        axes[row][0].fill_between(steps, [point["interval"][0] for point in curve],
                                  [point["interval"][1] for point in curve], color=color, alpha=0.08, linewidth=0)
        divergence = [(r["step"], max(r["reverse_kl"], 1e-4)) for r in records if "reverse_kl" in r]
        axes[row][1].plot(*zip(*divergence), style, color=color, label=label, linewidth=1)
        axes[row][0].axhline(arm["teacher_accuracy"], color="gray", linewidth=0.8, linestyle=":")
    for row, task in enumerate(tasks):
        axes[row][0].set(title=f"{task}: held-out greedy accuracy (dotted: teacher)", xlabel="step", ylim=(-0.02, 1.02))
        axes[row][1].set(title=f"{task}: per-token reverse KL to the teacher", xlabel="step", yscale="log")
        axes[row][0].legend(fontsize=7, ncol=3)
    figure.text(0.5, 0.005, "solid: opd+ (exact weight, sampled token)   dash-dot: dense (exact, whole distribution)   "
                "dashed: opd (stop-gradient reward)   bands: 95 % Wilson intervals", ha="center", fontsize=9)
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
