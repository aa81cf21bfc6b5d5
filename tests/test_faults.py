"""Fault battery (issue 24, "Data lost" and "Signals and the file system"): two runs on one
folder, a fresh start after a run that died before its first checkpoint, a refused resume,
divergence and the checkpoint it advises, SIGINT/SIGTERM mid-training, and output that cannot be
written (a file in the way, a read-only folder, a full disk).

New names are imported inside the tests, so that each test fails on its own without the code
it checks."""
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from star_mamba import checkpoint as ckpt
from star_mamba.engine.checkpointer import Checkpointer
from star_mamba.engine.metrics import read_metrics
from star_mamba.errors import CheckpointError, DivergedError
from star_mamba.tasks.pretrain import pretrain

from .conftest import PRETRAIN_RUN, ROOT, output_of, pretrain_config, run_cli

POLL_S = 0.05  # between looks at a running process's metrics.jsonl
WAIT_S = 240  # for a subprocess to log its first step, or to end


def steps_logged(out) -> list[int]:
    return [row["step"] for row in read_metrics(Path(out) / "metrics.jsonl")]


def finite(weights: dict) -> bool:
    return all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def cli_sets(out, *extra: str) -> list[str]:
    return [f"--set={s}" for s in (*PRETRAIN_RUN, f"run.output_dir={out}", *extra)]


def cli_in_process(out, *extra: str) -> int:
    from star_mamba.cli import main
    return main(["pretrain", *cli_sets(out, *extra)])


# ------------------------------------------------------------------ 1. one run per folder

def test_a_second_run_on_a_locked_folder_stops_at_start_naming_the_holder(tmp_path):
    """The test process holds the folder's lock (the same helper a run uses): a run started on
    it stops before training with one line naming the folder and the holder's PID and host."""
    from star_mamba.engine.outdir import RunLock
    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock(out)
    lock.acquire()
    try:
        done = run_cli("pretrain", [*PRETRAIN_RUN, f"run.output_dir={out}", "run.max_steps=1"])
    finally:
        lock.release()
    assert done.returncode == 2, output_of(done)
    line, = done.stderr.strip().splitlines()
    assert str(out) in line and f"pid {os.getpid()} on {socket.gethostname()}" in line, line
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path):
    """A run SIGKILLed mid-training leaves its lock file behind, but the kernel has dropped
    the lock: the next one takes it (tests/test_reliability.py resumes such runs)."""
    from star_mamba.engine.outdir import RunLock
    killed = run_cli("pretrain", [*PRETRAIN_RUN, f"run.output_dir={tmp_path}"],
                     env={"STAR_MAMBA_KILL_AT_STEP": "1"})
    assert killed.returncode == -signal.SIGKILL, output_of(killed)
    assert (tmp_path / ".lock").read_text().startswith("pid ")
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.held
    lock.release()


# ------------------------------------------------------------------ 2. fresh start, fresh files

def test_a_fresh_start_moves_the_files_of_a_run_that_died_before_its_first_checkpoint(tmp_path):
    """metrics.jsonl and log.txt of an earlier run but no checkpoint: the new run writes new
    files (steps 1..2 only) and keeps the old ones as <name>.1.old."""
    old_rows = "".join(f'{{"step": {s}, "epoch": 0, "loss": 9.0}}\n' for s in (1, 2, 3))
    (tmp_path / "metrics.jsonl").write_text(old_rows)
    (tmp_path / "log.txt").write_text("12:00:00 a line of the run that died\n")
    pretrain(pretrain_config(tmp_path, "run.max_steps=2"))
    assert steps_logged(tmp_path) == [1, 2]
    assert "the run that died" not in (tmp_path / "log.txt").read_text()
    assert (tmp_path / "metrics.jsonl.1.old").read_text() == old_rows
    assert "the run that died" in (tmp_path / "log.txt.1.old").read_text()
    assert "moved aside as metrics.jsonl.1.old, log.txt.1.old" in (tmp_path / "log.txt").read_text()


# ------------------------------------------------------------------ 3. config.yaml

def test_a_refused_resume_leaves_config_yaml_byte_identical(tmp_path):
    pretrain(pretrain_config(tmp_path, "run.max_steps=1"))
    before = {n: (tmp_path / n).read_bytes() for n in ("config.yaml", "metrics.jsonl")}
    with pytest.raises(CheckpointError, match="another model"):
        pretrain(pretrain_config(tmp_path, "run.max_steps=2", "model.embed_dim=64"))
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert not list(tmp_path.glob("*.old"))  # a resume, refused: nothing moved aside


# ------------------------------------------------------------------ 4. divergence

@pytest.mark.parametrize("sane_steps", [0, 8], ids=["from_scratch", "after_an_epoch"])
def test_divergence_advises_a_checkpoint_that_trains_on_with_a_sane_lr(tmp_path, sane_steps):
    """optim.blr=1e6 blows the weights up in one step; the non-finite losses then stop the run.
    The message names what to resume from (run.resume=...): after a sane epoch, that epoch's
    checkpoint, not the latest one, which holds the weights the NaNs came from; from scratch,
    run.resume=never. Following it with a sane lr trains on with finite weights."""
    if sane_steps:
        pretrain(pretrain_config(tmp_path, f"run.max_steps={sane_steps}"))
    with pytest.raises(DivergedError) as stop:
        pretrain(pretrain_config(tmp_path, "optim.blr=1e6", "run.save_every_steps=1",
                                 "run.max_nonfinite=2"))
    advice = re.search(r"run\.resume=(\S+)", str(stop.value))
    assert advice, str(stop.value)
    if sane_steps:
        assert advice.group(1) == str(tmp_path / Checkpointer.numbered(1)), str(stop.value)
    else:
        assert advice.group(1) == "never", str(stop.value)
    goal = sane_steps + 4
    summary = pretrain(pretrain_config(tmp_path, f"run.resume={advice.group(1)}",
                                       f"run.max_steps={goal}"))
    assert summary["step"] == goal
    saved = ckpt.load_checkpoint(tmp_path / ckpt.LATEST)
    assert saved["state"]["step"] == goal and finite(saved["model"])
    assert all(row["loss"] < 10 for row in read_metrics(tmp_path / "metrics.jsonl")[-4:])


# ------------------------------------------------------------------ 5. signals

def start_pretraining(out, *extra: str) -> subprocess.Popen:
    """``python -m star_mamba pretrain`` on a run far longer than the test waits for."""
    return subprocess.Popen([sys.executable, "-m", "star_mamba", "pretrain",
                             *cli_sets(out, "optim.epochs=50", *extra)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_first_step(proc: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ((out / "metrics.jsonl").exists() and steps_logged(out)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no step logged"
        time.sleep(POLL_S)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_at_a_step_saves_and_the_run_resumes(tmp_path, signum, code):
    """After the first logged step: exit code 128 + signal, one line naming the step and the
    checkpoint, which holds that step (the last logged one); no traceback. The next run removes
    a stray *.tmp of an interrupted save and resumes from that step."""
    proc = start_pretraining(tmp_path)
    wait_for_first_step(proc, tmp_path)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == code, stdout[-3000:] + stderr[-3000:]
    assert "Traceback" not in stderr, stderr
    name = signal.Signals(signum).name
    lines = re.findall(rf"interrupted by {name} at step (\d+): saved (\S+); run again to resume",
                       stdout)
    assert len(lines) == 1, stdout[-3000:]
    step, path = int(lines[0][0]), lines[0][1]
    assert path == str(tmp_path / ckpt.LATEST)
    assert ckpt.load_checkpoint(path)["state"]["step"] == step == steps_logged(tmp_path)[-1]
    (tmp_path / f"{ckpt.LATEST}.x1y2.tmp").write_bytes(b"half a checkpoint")
    done = run_cli("pretrain", [*PRETRAIN_RUN, f"run.output_dir={tmp_path}", "optim.epochs=50",
                                f"run.max_steps={step + 2}"])
    assert done.returncode == 0, output_of(done)
    log = (tmp_path / "log.txt").read_text()
    assert re.search(rf"resumed from \S+{ckpt.LATEST} at step {step}, \d+ batches into epoch "
                     r"\d+/\d+", log)
    assert f"removed 1 temporary file(s) of an interrupted save in {tmp_path}" in log
    assert not list(tmp_path.glob("*.tmp"))
    assert steps_logged(tmp_path) == list(range(1, step + 3))


def test_a_second_signal_exits_at_once(tmp_path):
    """SIGTERM and SIGINT, sent together: the first handled asks for a stop at the step's end,
    the second ends the process there and then, saying so (exit 128 + that signal). Two
    signals of one kind could merge into one; two kinds both arrive, Python handles a pair
    pending at once in signal-number order, so which is second is not fixed."""
    proc = start_pretraining(tmp_path)
    wait_for_first_step(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=WAIT_S)
    second = re.search(r"second signal \((SIG\w+)\): exiting at once", stderr)
    assert second, stdout[-3000:] + stderr[-3000:]
    assert proc.returncode == 128 + signal.Signals[second.group(1)]
    assert "Traceback" not in stderr and "interrupted by" not in stdout


# ------------------------------------------------------------------ 6. output that cannot be written

@pytest.mark.parametrize("where", ["a_file", "below_a_file"])
def test_an_output_dir_blocked_by_a_file_is_one_line(tmp_path, capsys, where):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker if where == "a_file" else blocker / "run"
    assert cli_in_process(out, "run.max_steps=1") == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert f"cannot write run.output_dir {out}: a file is in the way" in line, line
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_output_dir_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert cli_in_process(out, "run.max_steps=1") == 2
    finally:
        out.chmod(0o755)
    line, = capsys.readouterr().err.strip().splitlines()
    assert f"cannot write run.output_dir {out}: permission denied (EACCES)" in line, line


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """A file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes fail with EFBIG) of
    half a checkpoint: the small files grow, the next save fails. One line names the
    checkpoint; the previous one still loads, and no temporary file is left."""
    pretrain(pretrain_config(tmp_path, "run.max_steps=2"))
    limit = (tmp_path / ckpt.LATEST).stat().st_size // 2

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "-m", "star_mamba", "pretrain",
                           *cli_sets(tmp_path, "run.max_steps=4")], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=WAIT_S, preexec_fn=limit_file_size)
    assert done.returncode == 2, output_of(done)
    line, = done.stderr.strip().splitlines()
    assert f"cannot write checkpoint {tmp_path / ckpt.LATEST}: " in line and "(EFBIG)" in line, line
    saved = ckpt.load_checkpoint(tmp_path / ckpt.LATEST)
    assert saved["state"]["step"] == 2 and finite(saved["model"])
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("override", ["optim.blr=.inf", "optim.lr=-inf", "optim.clip_grad=nan",
                                      "optim.weight_decay=nan"])
def test_a_non_finite_number_in_the_config_is_one_line_before_anything_is_written(
        tmp_path, override, capsys):
    """`--set optim.blr=.inf` once trained a step and saved 66 non-finite tensors."""
    from star_mamba.cli import main
    argv = ["pretrain", *(f"--set={s}" for s in (*PRETRAIN_RUN, override)),
            "--output-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    key = override.partition("=")[0]
    assert len(err) == 1 and key in err[0] and "expected a finite number" in err[0], err
    assert not list(tmp_path.iterdir())  # no checkpoint, log or metrics


def test_a_save_refuses_non_finite_weights_and_keeps_the_last_checkpoint(tmp_path):
    """The last line of defence: whatever reaches Trainer.save, NaN weights never reach a file."""
    from star_mamba.data.build import pretraining_set
    from star_mamba.engine.run import start_run
    from star_mamba.engine.trainer import Trainer, TrainTask
    from star_mamba.models.pretrain import StarPretrain
    from star_mamba.tasks.pretrain import pretrain_loss
    pretrain(pretrain_config(tmp_path, "run.max_steps=1"))
    before = (tmp_path / ckpt.LATEST).read_bytes()
    cfg = pretrain_config(tmp_path, "run.max_steps=2")
    model_cfg = cfg.model.star_config()
    with start_run(cfg, trains=True) as ctx:
        task = TrainTask("test", StarPretrain(model_cfg), model_cfg,
                         pretraining_set(cfg.data, model_cfg, cfg.run.seed), pretrain_loss)
        trainer = Trainer(cfg, ctx, task)  # resumed from the step-1 checkpoint
        with torch.no_grad():
            next(trainer.model.parameters()).fill_(float("nan"))
        with pytest.raises(DivergedError, match="non-finite"):
            trainer.save([ckpt.LATEST])
    assert (tmp_path / ckpt.LATEST).read_bytes() == before
