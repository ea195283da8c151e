"""Several processes, one set of results: `accelerate launch` with two CPU processes (gloo) writes the artifacts a
single process writes, byte for byte; a killed two-process launch resumes to the same bytes; one writer per
output folder. Every two-process test asserts the world size, so a launch that silently starts one process
cannot pass."""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_resume import ig_flags, read_bytes, saved_pairs

import run_clm_igf
from conftest import DRIVER, ROOT, tiny_flags
from igf import artifacts
from igf.config import METHODS as ALL_METHODS
from igf.config import ONLINE_METHODS
from igf.distributed import LOCK_FILE

ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
# the command the README gives for a GPU-less machine (`--cpu` would silently start one process)
LAUNCH = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process, as in the single-process reference

# every static method (the online rules and the conditional models need first-order SGD IG and have their own
# tests: tests/test_online.py); the launch deals their runs out like any other
METHODS = [m for m in ALL_METHODS if m not in ONLINE_METHODS + ("color", "color_validation")]


def launch(argv, log, **kwargs):
    with open(log, "w") as fh:
        return subprocess.Popen([*LAUNCH, DRIVER, *argv], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=ENV,
                                **kwargs)


def finished(proc, log):
    assert proc.wait(timeout=600) == 0, open(log).read()[-4000:]


@pytest.mark.skipif(not os.path.exists(ACCELERATE), reason="accelerate's launcher is not installed")
def test_two_processes_write_the_single_process_artifacts(tiny_model, text_folders, tmp_path):
    """Every method (a training folder of two sources, for source_matched) on two pipelines."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--methods", *METHODS, "--num_pipelines", "2"]
    assert run_clm_igf.main(tiny_flags(tiny_model, text_folders, one) + extra) == 0
    finished(launch(tiny_flags(tiny_model, text_folders, two) + extra, tmp_path / "two.log"), tmp_path / "two.log")
    config = json.load(open(two / artifacts.CONFIG))
    assert config["launch"]["num_processes"] == 2 and config["launch"]["backend"] == "gloo"
    assert json.load(open(two / artifacts.TIMINGS))["num_processes"] == 2
    assert json.load(open(one / artifacts.CONFIG))["launch"]["num_processes"] == 1
    # exact IG per context is deterministic and every chunk is labelled as in one process: the same bytes
    second = os.path.join(artifacts.PIPELINES, "1")
    for name in (artifacts.IG_PAIRS, artifacts.LEARNER_METRICS, artifacts.RESULTS, artifacts.RESULTS_TABLE,
                 artifacts.DATA, artifacts.CONTEXTS, artifacts.SELECTION, os.path.join(second, artifacts.IG_PAIRS),
                 os.path.join(second, artifacts.LEARNER_METRICS)):
        assert read_bytes(one / name) == read_bytes(two / name), name
    for runs_dir in (artifacts.RUNS, os.path.join(second, artifacts.RUNS)):
        runs = sorted(os.listdir(one / runs_dir))
        assert runs == sorted(os.listdir(two / runs_dir)) and len(runs) == 2 * len(METHODS)  # own standard runs
        for name in runs:
            assert read_bytes(one / runs_dir / name) == read_bytes(two / runs_dir / name), name
    log = open(tmp_path / "two.log").read()
    assert log.count("=== 2) information gain (pipeline 1) ===") == 1  # logs from the main process only
    assert log.count("=== 5) statistics ===") == 1


@pytest.mark.skipif(not os.path.exists(ACCELERATE), reason="accelerate's launcher is not installed")
def test_killed_two_process_launch_resumes_to_the_same_bytes(tiny_model, text_files, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    path = killed / artifacts.IG_PAIRS
    proc = launch(ig_flags(tiny_model, text_files, killed), tmp_path / "killed.log", start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while (saved_pairs(path) or {"pairs": []})["pairs"].__len__() < 10:
            assert proc.poll() is None, open(tmp_path / "killed.log").read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint with 10 pairs within 300 s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both processes, at once
    finally:
        proc.wait()
    interrupted = saved_pairs(path)
    assert not interrupted["complete"] and 10 <= len(interrupted["pairs"]) < 200
    assert os.path.exists(killed / LOCK_FILE)  # left behind, but no longer locked: it must not block the resume
    finished(launch(ig_flags(tiny_model, text_files, killed), tmp_path / "resumed.log"), tmp_path / "resumed.log")
    assert run_clm_igf.main(ig_flags(tiny_model, text_files, clean)) == 0  # one process, uninterrupted
    assert read_bytes(path) == read_bytes(clean / artifacts.IG_PAIRS)
    assert json.load(open(killed / artifacts.CONFIG))["launch"]["num_processes"] == 2


def test_an_output_dir_in_use_is_refused_and_left_alone(tiny_model, text_files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = tiny_flags(tiny_model, text_files, out)
    assert run_clm_igf.main(argv) == 0
    before = {p: read_bytes(out / p) for p in (artifacts.IG_PAIRS, artifacts.RESULTS)}
    with open(out / LOCK_FILE, "a+") as holder:  # another invocation holds the folder
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("pid 4242 (run_clm_igf.py)\n")
        holder.flush()
        capsys.readouterr()
        assert run_clm_igf.main(argv + ["--overwrite_output_dir"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == f"error: --output_dir {out} is in use by pid 4242 (run_clm_igf.py); wait for it to " \
                          "finish, or use another --output_dir"
    assert {p: read_bytes(out / p) for p in before} == before
    assert run_clm_igf.main(argv) == 0  # the holder is gone: its lock file left behind blocks nothing


def test_a_second_invocation_waits_for_none_and_interleaves_nothing(tiny_model, text_files, tmp_path):
    """Two real processes on one folder: while the first collects IG pairs, the second is refused at once."""
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, DRIVER, *ig_flags(tiny_model, text_files, out)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while saved_pairs(out / artifacts.IG_PAIRS) is None:
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        # freeze the first run mid-collection: it keeps its lock, and it cannot finish (and release the lock)
        # while the second starts up, however fast this machine labels pairs
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run([sys.executable, DRIVER, *ig_flags(tiny_model, text_files, out)], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run must still be going"
        partial = saved_pairs(out / artifacts.IG_PAIRS)
    finally:
        first.kill()
        first.wait()
    assert not partial["complete"]  # the second run wrote nothing over the first's checkpoint
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert "is in use by pid" in second.stderr.strip().splitlines()[-1]
