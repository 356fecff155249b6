"""Damaged run directories, a full disk and non-finite options: one line naming the file or option, a fallback
to the previous complete checkpoint, and never a run that reports success without having trained."""

import errno
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from opdplus import checkpoint as checkpoint_module
from opdplus.checkpoint import MANIFEST, resumable_checkpoint, verify_checkpoint
from opdplus.cli import main
from opdplus.config import TrainConfig
from opdplus.metrics import MetricsLog
from opdplus.trainer import NonFiniteRunError, train


def quick_config(models, out, **overrides):
    settings = dict(task="arith", student=models["student"], teacher=models["teacher"], out=str(out),
                    divergence="jsd", steps=4, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8,
                    eval_every=0, save_every=2, tensorboard=False, seed=3)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def finished(models, tmp_path_factory):
    """A finished 4-step run with checkpoint-2 and checkpoint-4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(quick_config(models, out), progress=False)
    return out


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def damaged_copy(finished, tmp_path, name, damage=truncate):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "final")
    damage(out / "checkpoint-4" / name)
    return out


def test_checkpoints_carry_a_manifest_of_sizes_and_hashes(finished):
    manifest = json.loads((finished / "checkpoint-4" / MANIFEST).read_text())
    files = {path.name for path in (finished / "checkpoint-4").iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == files
    for name, entry in manifest["files"].items():
        assert entry["size"] == (finished / "checkpoint-4" / name).stat().st_size and len(entry["sha256"]) == 64
    verify_checkpoint(finished / "checkpoint-4")


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(models, finished, tmp_path, name):
    out = damaged_copy(finished, tmp_path, name)
    with pytest.warns(UserWarning, match=f"checkpoint-4/{name}.*resuming from .*checkpoint-2") as caught:
        assert resumable_checkpoint(out) == out / "checkpoint-2"
    assert all(str(w.message).count("\n") == 0 for w in caught)
    if name == "model.safetensors":  # the whole resume through the CLI reaches the uninterrupted weights
        with pytest.warns(UserWarning, match="checkpoint-4/model.safetensors"):
            train(quick_config(models, out, resume=True), progress=False)
        reference, resumed = load_file(finished / "final" / "model.safetensors"), \
            load_file(out / "final" / "model.safetensors")
        assert all(torch.equal(reference[key], resumed[key]) for key in reference)


def test_no_usable_checkpoint_is_one_line_naming_the_file(models, finished, tmp_path, capsys):
    out = damaged_copy(finished, tmp_path, "optimizer.pt")
    truncate(out / "checkpoint-2" / "rng.pt")
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    code = main(["train", "--student", models["student"], "--teacher", models["teacher"], "--out", str(out),
                 "--task", "arith", "--divergence", "jsd", "--steps", "4", "--prompts-per-step", "2",
                 "--samples-per-prompt", "2", "--max-new-tokens", "8", "--eval-every", "0", "--save-every", "2",
                 "--seed", "3", "--no-tensorboard", "--no-progress", "--resume"])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "checkpoint-2/rng.pt" in error and "no usable checkpoint" in error
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_checkpoint_without_manifest_is_checked_by_loading_it(finished, tmp_path):
    def drop_manifest_and_truncate(path):
        (path.parent / MANIFEST).unlink()
        truncate(path)

    out = damaged_copy(finished, tmp_path, "optimizer.pt", drop_manifest_and_truncate)
    with pytest.raises(ValueError, match="checkpoint-4/optimizer.pt"):
        verify_checkpoint(out / "checkpoint-4")
    (out / "checkpoint-2" / MANIFEST).unlink()
    verify_checkpoint(out / "checkpoint-2")  # an older, intact checkpoint without a manifest still loads


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    lines = [json.dumps({"step": step, "loss": 0.5}) for step in range(4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 4, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:5.*dropped"):
        log = MetricsLog(tmp_path, keep_through=4, tensorboard=False)
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines) + "\n"


def test_torn_metrics_line_elsewhere_names_file_and_line(tmp_path):
    text = '{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n'
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: ") as caught:
        MetricsLog(tmp_path, keep_through=2, tensorboard=False)
    assert str(caught.value).count("\n") == 0
    assert (tmp_path / "metrics.jsonl").read_text() == text


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
])
def test_disk_full_while_checkpointing_is_one_line_naming_the_path(models, tmp_path, monkeypatch, capsys, failure):
    def full_disk(*args, **kwargs):
        raise failure

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    if not isinstance(failure, OSError):  # torch says nothing of the cause: the free space does
        monkeypatch.setattr(checkpoint_module, "free_bytes", lambda path: 0)
    out = tmp_path / "run"
    code = main(["train", "--student", models["student"], "--teacher", models["teacher"], "--out", str(out),
                 "--task", "arith", "--steps", "2", "--prompts-per-step", "2", "--samples-per-prompt", "2",
                 "--max-new-tokens", "8", "--eval-every", "0", "--save-every", "1", "--no-tensorboard",
                 "--no-progress"])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"opdplus train: error: no space left on device writing {out / 'checkpoint-1'}"
    assert not list(out.glob(".*.tmp-*")) and not list(out.glob("checkpoint-*"))


def test_disk_full_while_logging_metrics_names_the_file(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path, keep_through=-1, tensorboard=False)

    class FullFile:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    log.handle = FullFile()
    with pytest.raises(OSError, match=f"^no space left on device writing {tmp_path / 'metrics.jsonl'}$"):
        log.write({"step": 1})


@pytest.mark.parametrize("flag,value,message", [
    ("--lr", "inf", "lr must be"),
    ("--lr", "1e308", "lr must be"),
    ("--weight-decay", "inf", "weight_decay must be"),
    ("--temperature", "inf", "temperature must be"),
    ("--lora-alpha", "nan", "lora_alpha must be"),
    ("--max-grad-norm", "inf", "max_grad_norm must be"),
    ("--seed", "99999999999999999999", "seed must be"),
    ("--seed=-1", None, "seed must be"),
])
def test_non_finite_or_out_of_range_options_are_refused_up_front(models, tmp_path, capsys, flag, value, message):
    out = tmp_path / "run"
    code = main(["train", "--student", models["student"], "--teacher", models["teacher"], "--out", str(out),
                 "--steps", "1", "--prompts-per-step", "1", "--samples-per-prompt", "1", "--max-new-tokens", "2",
                 "--eval-every", "0", "--no-tensorboard", "--no-progress", flag, *([value] if value is not None else [])])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and message in error
    assert not out.exists()


def test_run_without_any_applied_update_does_not_end_done(models, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteRunError, match="no update was applied"):
        train(quick_config(models, out, divergence="alpha:1e308", steps=2, save_every=0, max_bad_steps=5),
              progress=False)
    assert not (out / "final").exists()


def test_checkpoint_with_non_finite_weights_is_not_written(models, tmp_path):
    from transformers import AutoModelForCausalLM

    from opdplus.checkpoint import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(models["student"])
    with torch.no_grad():
        next(model.parameters())[0] = float("inf")
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW(model.parameters()), lambda step: 1.0)
    with pytest.raises(ValueError, match="checkpoint-1 not written: weight .* is not finite"):
        save_checkpoint(tmp_path, 1, model, None, {}, scheduler, {}, keep_last=2)
    assert not list(tmp_path.iterdir())
