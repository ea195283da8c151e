"""Resume without loss: a SIGKILLed IG collection, rerun, ends byte-identical to an uninterrupted one; a deleted
fine-tuning run is the only one recomputed, and the results do not change; a resume with nothing to do keeps the
timings of the run that did the work."""
import json
import os
import signal
import subprocess
import sys
import time

import run_clm_igf
from conftest import DRIVER, ROOT, set_flag, tiny_flags


def read_bytes(path):
    with open(path, "rb") as fh:
        return fh.read()


def ig_flags(tiny_model, text_files, out):
    """IG collection only, slow enough to interrupt: 200 pairs, each evaluated on a 40-context objective set in
    forward passes of 4 (~10 passes per pair), checkpointed every 5 pairs."""
    argv = tiny_flags(tiny_model, text_files, out)
    for flag, value in [("--stages", "ig_pairs"), ("--num_ig_pairs", "200"), ("--ig_save_every", "5"),
                        ("--size_objective_set", "40"), ("--ig_eval_batch_size", "4")]:
        argv = set_flag(argv, flag, value)
    return argv


def run_driver(argv, log):
    with open(log, "w") as fh:
        return subprocess.run([sys.executable, DRIVER, *argv], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                              timeout=600).returncode


def saved_pairs(path):
    """The checkpoint's pairs (None while there is no checkpoint). Writes are atomic: never half a file."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def test_killed_ig_collection_resumes_to_the_same_bytes(tiny_model, text_files, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    path = killed / "ig_pairs.json"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, DRIVER, *ig_flags(tiny_model, text_files, killed)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, "collection ended before it could be interrupted: " + \
                open(tmp_path / "killed.log").read()[-2000:]
            saved = saved_pairs(path)
            if saved is not None and len(saved["pairs"]) >= 10:
                break
            assert time.monotonic() < deadline, "no checkpoint with 10 pairs within 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    interrupted = saved_pairs(path)
    n = len(interrupted["pairs"])
    assert not interrupted["complete"] and 10 <= n < 200 and n % 5 == 0, n
    assert [p["pair"] for p in interrupted["pairs"]] == list(range(n))

    assert run_driver(ig_flags(tiny_model, text_files, killed), tmp_path / "resumed.log") == 0, \
        open(tmp_path / "resumed.log").read()[-3000:]
    assert run_driver(ig_flags(tiny_model, text_files, clean), tmp_path / "clean.log") == 0, \
        open(tmp_path / "clean.log").read()[-3000:]

    resumed = saved_pairs(path)
    assert resumed["complete"]
    assert [p["pair"] for p in resumed["pairs"]] == list(range(200))  # no duplicates, no gaps
    assert len({p["context_index"] for p in resumed["pairs"]}) == 200
    assert resumed["pairs"][:n] == [{**p, "ig_z": q["ig_z"]} for p, q in zip(interrupted["pairs"], resumed["pairs"])]
    assert read_bytes(path) == read_bytes(clean / "ig_pairs.json")


def test_deleted_run_is_the_only_one_recomputed(tiny_model, text_files, tmp_path):
    out = tmp_path / "out"
    argv = tiny_flags(tiny_model, text_files, out)
    assert run_clm_igf.main(argv) == 0
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 6  # 3 methods x 2 runs
    contents = {p.name: read_bytes(p) for p in runs}
    mtimes = {p.name: p.stat().st_mtime_ns for p in runs}
    results, timings = read_bytes(out / "results.json"), read_bytes(out / "timings.json")
    assert run_clm_igf.main(argv) == 0  # nothing to do: every artifact is reused
    assert read_bytes(out / "timings.json") == timings and read_bytes(out / "results.json") == results
    victim = out / "runs" / "igf_shifting_run000.json"
    os.remove(victim)

    assert run_driver(argv, tmp_path / "rerun.log") == 0, open(tmp_path / "rerun.log").read()[-3000:]
    assert read_bytes(victim) == contents[victim.name]  # recomputed, in a new process, to the same bytes
    for p in runs:
        if p != victim:
            assert p.stat().st_mtime_ns == mtimes[p.name], f"{p.name} was rewritten"
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(contents)
    assert read_bytes(out / "results.json") == results
    assert read_bytes(out / "timings.json") != timings  # this invocation trained a run: its own timings
    log = open(tmp_path / "rerun.log").read()
    assert "[igf_shifting run 0]" in log and "[standard run" not in log and "[igf_constant run" not in log
