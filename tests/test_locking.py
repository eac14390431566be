"""One command per output directory: real second processes, a real SIGKILL, no stuck lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cli_process import TINY_MODEL, cdcl, cdcl_argv, cdcl_env, wait_for
from lock_holder import start_holder

from cdcl.errors import CdclError
from cdcl.locking import LockedError, lock_file, output_lock

TINY_TRAIN = [*TINY_MODEL, "train.batch_size=8"]


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def test_lock_file_sits_next_to_the_directory_and_goes_away(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "a"
    path = lock_file(out)
    assert path == tmp_path.resolve() / "runs" / ".a.lock"
    assert lock_file(tmp_path / "runs" / "." / "a") == path
    with output_lock(out, "cdcl test") as held:
        assert held == path
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(LockedError, match="already locked by this process"):
            with output_lock(out, "cdcl test"):
                pass
    assert not path.exists()
    assert not out.exists()  # the lock never creates the directory itself
    assert issubclass(LockedError, CdclError)


def test_synth_stops_at_once_while_another_process_holds_the_directory(tmp_path: Path) -> None:
    out = tmp_path / "screen"
    holder = start_holder(out, tmp_path)
    try:
        proc = cdcl("synth", "--preset", "tiny", "--out", out, "--no-progress")
    finally:
        _kill(holder)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert str(out) in lines[0] and f"pid {holder.pid}" in lines[0]
    assert socket.gethostname() in lines[0] and "test holder" in lines[0]
    assert not out.exists()
    # SIGKILL left the lock file behind, unlocked: the next command takes it over.
    assert lock_file(out).exists()
    ok = cdcl("synth", "--preset", "tiny", "--out", out, "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert (out / "samples.parquet").is_file()
    assert not lock_file(out).exists()


@pytest.mark.slow
def test_second_train_into_a_running_run_stops_and_a_killed_train_leaves_no_lock(
    tmp_path: Path,
) -> None:
    data = tmp_path / "screen"
    assert cdcl("synth", "--preset", "tiny", "--out", data, "--no-progress").returncode == 0
    run = tmp_path / "run"
    first = subprocess.Popen(
        cdcl_argv("train", "--preset", "synthetic-cdcl", "--data", data, "--out", run)
        + [*TINY_TRAIN, "train.epochs=1000", "train.save_every_steps=1"],
        env=cdcl_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Wait until the first run has written a checkpoint: it is training, not starting.
        wait_for(lambda: (run / "checkpoints" / "last.pt").exists(), "a first checkpoint")
        assert first.poll() is None
        second = cdcl(
            "train", "--preset", "synthetic-cdcl", "--data", data, "--out", run, "--resume",
            *TINY_TRAIN, "train.epochs=1000", "train.save_every_steps=1",
        )  # fmt: skip
        assert first.poll() is None  # the second run did not disturb the first
    finally:
        _kill(first)
    assert second.returncode == 2, second.stderr
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, second.stderr
    assert str(run) in lines[0] and f"pid {first.pid}" in lines[0] and "cdcl train" in lines[0]
    # The killed run's lock is gone with it: a new command takes the directory.
    later = start_holder(run, tmp_path)
    _kill(later)


def test_many_processes_never_hold_the_lock_together(tmp_path: Path) -> None:
    """Contenders that lock, check exclusivity and release in a tight loop (release unlinks)."""
    script = """
import os, sys, time
from pathlib import Path
from cdcl.locking import LockedError, output_lock
out, inside, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
got = 0
while got < n:
    try:
        with output_lock(out, "contender"):
            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if shared
            os.close(fd)
            time.sleep(0.001)
            inside.unlink()
            got += 1
    except LockedError:
        time.sleep(0.0005)
"""
    out, inside = tmp_path / "d", tmp_path / "inside"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(out), str(inside), "40"], env=cdcl_env()
        )
        for _ in range(4)
    ]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0, 0, 0]
    assert not inside.exists() and not lock_file(out).exists()


@pytest.mark.slow
def test_torchrun_into_a_held_directory_stops_on_rank_0(tmp_path: Path) -> None:
    """Only rank 0 takes the lock; its one-line error ends the whole torchrun job."""
    data = tmp_path / "screen"
    assert cdcl("synth", "--preset", "tiny", "--out", data, "--no-progress").returncode == 0
    run = tmp_path / "run"
    holder = start_holder(run, tmp_path)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
            + ["-m", "cdcl", "train", "--preset", "synthetic-cdcl", "--data", str(data)]
            + ["--out", str(run), *TINY_TRAIN, "train.epochs=1"],
            capture_output=True,
            text=True,
            env=cdcl_env(),
            timeout=300,
        )
    finally:
        _kill(holder)
    assert proc.returncode != 0
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("cdcl train:")]
    assert len(ours) == 1 and f"pid {holder.pid}" in ours[0] and str(run) in ours[0], proc.stderr
    assert not run.exists()
