"""--allocator: 'heap' keeps large blocks in glibc's heap (no page fault per 4 KiB on reuse), 'system' leaves the C
library alone, and the choice changes no result. mallopt cannot be undone in a process, so each case runs in a
fresh interpreter."""
import os
import subprocess
import sys

import pytest

from conftest import DRIVER, ROOT, set_flag, tiny_flags
from igf.allocator import is_glibc, use_allocator

# Rounds of one SmolLM2-sized gradient (49,152 x 576 float32 = 113 MB): allocate, touch, free. Prints the
# allocator line, then the minor page faults of ten rounds after twenty warm-up rounds. The heap needs a few rounds
# to settle: torch asks for 64-byte-aligned blocks, which glibc serves from a slightly larger free chunk, so the
# first freed blocks are too small for the next request until neighbours coalesce.
ROUNDS = """
import resource, sys, torch
from igf.allocator import use_allocator
print(use_allocator(sys.argv[1]))
def touch():
    x = torch.empty(49152, 576)
    x.fill_(1.0)
for _ in range(20):
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def child(args, **kw):
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
                          **kw)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_an_unknown_allocator_is_refused():
    with pytest.raises(ValueError, match="heap, system"):
        use_allocator("jemalloc")


def test_system_leaves_the_c_library_alone():
    assert use_allocator("system") == "allocator: the C library's defaults"


@pytest.mark.skipif(not is_glibc(), reason="the heap allocator sets glibc's mallopt")
def test_heap_reuses_freed_blocks_without_page_faults():
    faults = {}
    for name in ("system", "heap"):
        line, count = child(["-c", ROUNDS, name]).split("\n")[:2]
        faults[name] = int(count)
        if name == "heap":
            assert "M_MMAP_MAX=0" in line and "M_TRIM_THRESHOLD=2147483647" in line and "refused" not in line
    # glibc's defaults map and unmap the block every round: ~27,600 faults each; the heap reuses its blocks
    assert faults["system"] > 10 * 20_000, faults
    assert faults["heap"] < faults["system"] / 20, faults


def test_the_allocator_changes_no_result(tiny_model, text_files, tmp_path):
    """IG pairs and fine-tuning runs are byte-identical with either allocator (each run in its own process)."""
    outputs = {}
    for name in ("heap", "system"):
        args = set_flag(tiny_flags(tiny_model, text_files, tmp_path / name), "--allocator", name)
        args = set_flag(args, "--num_runs", "1")
        stdout = child([DRIVER, *args])
        assert ("every block from the heap" if name == "heap" and is_glibc() else "C library's defaults") in stdout
        folder = tmp_path / name
        outputs[name] = {path: (folder / path).read_bytes()
                         for path in ("ig_pairs.json", "runs/standard_run000.json", "runs/igf_constant_run000.json")}
    assert outputs["heap"] == outputs["system"]
