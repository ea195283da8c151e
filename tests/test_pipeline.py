"""The driver end to end on the tiny model: every artifact, flags that take effect, byte-identical reruns,
plot-only redraws, resuming from saved artifacts, and the command line as a subprocess."""
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import run_clm_igf
from conftest import ROOT, tiny_flags
from igf import artifacts
from igf.config import DEFAULT_METHODS as METHODS
from igf.config import parse_args

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def with_flags(args, **flags):
    """``args`` with each flag set: an existing single-valued flag gets its value replaced, others are appended."""
    out = list(args)
    for name, value in flags.items():
        values = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        flag = f"--{name}"
        if flag in out and len(values) == 1:
            out[out.index(flag) + 1] = values[0]
        else:
            assert flag not in out, flag
            out += [flag, *values]
    return out


def out_dir(args):
    return args[args.index("--output_dir") + 1]


def read(folder, name):
    with open(os.path.join(folder, name), "rb") as fh:
        return fh.read()


def run_files(folder):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, artifacts.RUNS, "*.json")))


def expected_run_files(methods, num_runs):
    return sorted(f"{m}_run{r:03d}.json" for m in methods for r in range(num_runs))


def mtimes(folder):
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(folder, artifacts.RUNS, "*.json"))}


@pytest.fixture(scope="module")
def base(tiny_model, text_files, tmp_path_factory):
    """One complete run with the tiny flags, shared by the tests that only read or copy its artifacts."""
    args = tiny_flags(tiny_model, text_files, tmp_path_factory.mktemp("base") / "out")
    assert run_clm_igf.main(args) == 0
    return args


@pytest.fixture
def base_copy(base, tmp_path):
    """A private copy of the base output directory and the flags pointing at it."""
    folder = tmp_path / "copy"
    shutil.copytree(out_dir(base), folder)
    return with_flags(base, output_dir=folder)


def reuse(base, folder, *names):
    """A fresh output directory holding copies of some of the base run's artifacts (skips recomputing them)."""
    os.makedirs(folder)
    for name in names:
        shutil.copy2(os.path.join(out_dir(base), name), folder)
    return str(folder)


# ----------------------------------------------------------------------------- artifacts

def test_every_artifact_is_written(base):
    folder = out_dir(base)
    only_when_asked = {artifacts.PIPELINES: "--num_pipelines > 1", artifacts.MODELS: "--save_models"}
    for name in artifacts.ALL:
        assert os.path.exists(os.path.join(folder, name)) != (name in only_when_asked), name
    assert run_files(folder) == expected_run_files(METHODS, 2)

    assert read(folder, artifacts.FIGURE)[:8] == PNG_MAGIC
    import matplotlib.image
    assert matplotlib.image.imread(os.path.join(folder, artifacts.FIGURE)).ndim == 3

    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(os.path.join(folder, artifacts.IG_PAIRS)).st_mode & 0o777 == 0o666 & ~umask  # not private
    config = artifacts.read_json(os.path.join(folder, artifacts.CONFIG))
    launch = config.pop("launch")  # how the run was launched: one process here, on the CPU
    assert launch == {"num_processes": 1, "device": "cpu", "backend": None}
    assert config == json.loads(artifacts.dumps(parse_args(base).to_dict()))
    assert config["data"]["context_len"] == 16 and config["finetune"]["num_runs"] == 2
    assert config["learner"]["learner_epochs"] == 20 and config["run"]["output_dir"] == folder

    pairs = artifacts.read_json(os.path.join(folder, artifacts.IG_PAIRS))
    assert pairs["complete"] and len(pairs["pairs"]) == 24
    # each pair names its pool row; the file holds no text (pipelines.without_tokens)
    assert all("tokens" not in p and 0 <= p["context_index"] and math.isfinite(p["ig"]) for p in pairs["pairs"])
    assert {p["source"] for p in pairs["pairs"] + pairs["validation"]} == {"train"}  # the training file
    assert math.isfinite(pairs["ppl_before"])

    learner = torch.load(os.path.join(folder, artifacts.LEARNER), weights_only=True)
    assert set(learner) >= {"fingerprint", "state", "arch", "metrics"}
    metrics = artifacts.read_json(os.path.join(folder, artifacts.LEARNER_METRICS))
    assert metrics["n_train"] + metrics["n_val"] == 24

    for name in run_files(folder):
        record = artifacts.read_json(os.path.join(folder, artifacts.RUNS, name))
        assert record["steps"] == [0, 1, 2, 3]
        assert all(math.isfinite(v) and v > 1 for v in record["test_ppl"])
        assert len(record["candidates_drawn"]) == 3 and all(d >= 4 for d in record["candidates_drawn"])

    record = artifacts.read_json(os.path.join(folder, artifacts.RUNS, "igf_constant_run000.json"))
    kept = [r for batch in record["kept_rows"] for r in batch]
    assert record["pipeline"] == 0 and len(record["kept_loss"]) == len(kept) == 12  # every kept context (<= 256)
    assert sum(record["kept_unigrams"].values()) == 12 * 16 and "kept_sources" in record  # one source: the file
    assert artifacts.read_json(os.path.join(folder, artifacts.RUNS, "standard_run000.json"))["pipeline"] == 0
    selection = artifacts.read_json(os.path.join(folder, artifacts.SELECTION))
    assert set(selection["methods"]) == set(METHODS) and selection["source_names"] == ["train", "validation", "test"]
    assert read(folder, artifacts.SELECTION_FIGURE)[:8] == PNG_MAGIC
    assert "| igf_constant |" in read(folder, artifacts.SELECTION_TABLE).decode()
    assert learner["built_on"]["context_len"] == 16 and set(learner["scale"]) == {"mean", "std"}

    results = artifacts.read_json(os.path.join(folder, artifacts.RESULTS))
    assert set(results["methods"]) == set(METHODS)
    assert set(results["tests"]) == {"igf_constant_vs_standard", "igf_shifting_vs_standard"}
    for summary in results["methods"].values():
        assert summary["runs"] == 2
        assert math.isfinite(summary["final_test_ppl"]["mean"]) and math.isfinite(summary["auc_test_ppl"]["mean"])
    assert results["methods"]["standard"]["candidates_per_kept_context"] == 1.0
    for method in ("igf_constant", "igf_shifting"):  # the filter rejected candidates
        assert results["methods"][method]["candidates_per_kept_context"] > 1.0

    timings = artifacts.read_json(os.path.join(folder, artifacts.TIMINGS))
    assert {"load", "ig_pairs", "learner", "finetune", "total"} <= set(timings)


# ----------------------------------------------------------------------------- flags take effect

def test_max_steps_and_num_runs_take_effect(base, tmp_path):
    folder = reuse(base, tmp_path / "short", artifacts.IG_PAIRS, artifacts.LEARNER)  # same pairs and learner
    args = with_flags(base, output_dir=folder, max_steps=2, num_runs=1)
    assert run_clm_igf.main(args) == 0
    folder = out_dir(args)
    assert run_files(folder) == expected_run_files(METHODS, 1)
    for method in METHODS:
        short = artifacts.read_json(os.path.join(folder, artifacts.RUNS, f"{method}_run000.json"))
        full = artifacts.read_json(os.path.join(out_dir(base), artifacts.RUNS, f"{method}_run000.json"))
        assert short["steps"] == [0, 1, 2] and full["steps"] == [0, 1, 2, 3]
        assert len(short["test_ppl"]) == 3 and len(full["test_ppl"]) == 4
    results = artifacts.read_json(os.path.join(folder, artifacts.RESULTS))
    assert all(s["runs"] == 1 for s in results["methods"].values())


def test_methods_standard_has_no_learner_and_no_igf_runs(base, tmp_path):
    folder = reuse(base, tmp_path / "std", artifacts.IG_PAIRS)
    args = with_flags(base, output_dir=folder, methods=["standard"])
    assert run_clm_igf.main(args) == 0
    folder = out_dir(args)
    assert not os.path.exists(os.path.join(folder, artifacts.LEARNER))
    assert not os.path.exists(os.path.join(folder, artifacts.LEARNER_METRICS))
    assert run_files(folder) == expected_run_files(["standard"], 2)
    results = artifacts.read_json(os.path.join(folder, artifacts.RESULTS))
    assert list(results["methods"]) == ["standard"] and results["tests"] == {}
    # the same seeds give the standard runs of the full experiment, byte for byte
    for name in run_files(folder):
        assert read(folder, os.path.join(artifacts.RUNS, name)) == read(out_dir(base),
                                                                         os.path.join(artifacts.RUNS, name))


def _ig_pairs_with(base, folder, **flags):
    args = with_flags(base, output_dir=folder, stages=["ig_pairs"], **flags)
    assert run_clm_igf.main(args) == 0
    return artifacts.read_json(os.path.join(folder, artifacts.IG_PAIRS))["pairs"]


def test_context_len_changes_ig_pair_contexts(base, tmp_path):
    pairs = _ig_pairs_with(base, tmp_path / "ctx8", context_len=8, num_ig_pairs=8)
    saved = artifacts.read_json(os.path.join(tmp_path / "ctx8", artifacts.IG_PAIRS))
    assert len(pairs) == 8 and saved["fingerprint"]["context_len"] == 8
    base_pairs = artifacts.read_json(os.path.join(out_dir(base), artifacts.IG_PAIRS))
    assert base_pairs["fingerprint"]["context_len"] == 16


def test_seed_changes_ig_pairs(base, tmp_path):
    pairs = _ig_pairs_with(base, tmp_path / "seed", seed=7, num_ig_pairs=8)
    base_pairs = artifacts.read_json(os.path.join(out_dir(base), artifacts.IG_PAIRS))["pairs"][:8]
    assert [p["context_index"] for p in pairs] != [p["context_index"] for p in base_pairs]
    assert [p["ig"] for p in pairs] != [p["ig"] for p in base_pairs]


# ----------------------------------------------------------------------------- determinism and reuse

def test_same_flags_give_byte_identical_artifacts(base, tmp_path):
    args = with_flags(base, output_dir=tmp_path / "again")
    assert run_clm_igf.main(args) == 0
    a, b = out_dir(base), out_dir(args)
    assert run_files(a) == run_files(b)
    names = [artifacts.IG_PAIRS, artifacts.LEARNER_METRICS, artifacts.RESULTS] + [
        os.path.join(artifacts.RUNS, n) for n in run_files(a)]
    for name in names:
        assert read(a, name) == read(b, name), f"{name} differs between identical runs"
    la, lb = (torch.load(os.path.join(f, artifacts.LEARNER), weights_only=True)["state"] for f in (a, b))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def test_plot_only_redraws_without_the_model(base_copy):
    folder = out_dir(base_copy)
    figure = os.path.join(folder, artifacts.FIGURE)
    results_before = read(folder, artifacts.RESULTS)
    os.remove(figure)
    args = with_flags(base_copy, model_name_or_path=os.path.join(folder, "no-such-model"))
    args.append("--plot_only")
    assert run_clm_igf.main(args) == 0
    assert read(folder, artifacts.FIGURE)[:8] == PNG_MAGIC
    assert read(folder, artifacts.RESULTS) == results_before


def test_rerun_reuses_artifacts_and_more_runs_only_add(base_copy):
    folder = out_dir(base_copy)
    before = mtimes(folder)
    learner_before = os.stat(os.path.join(folder, artifacts.LEARNER)).st_mtime_ns
    assert run_clm_igf.main(base_copy) == 0
    assert mtimes(folder) == before
    assert os.stat(os.path.join(folder, artifacts.LEARNER)).st_mtime_ns == learner_before

    assert run_clm_igf.main(with_flags(base_copy, num_runs=3)) == 0
    after = mtimes(folder)
    assert {p: t for p, t in after.items() if p in before} == before
    assert sorted(os.path.basename(p) for p in set(after) - set(before)) == [f"{m}_run002.json" for m in
                                                                            sorted(METHODS)]
    results = artifacts.read_json(os.path.join(folder, artifacts.RESULTS))
    assert all(s["runs"] == 3 for s in results["methods"].values())


# ----------------------------------------------------------------------------- the command line

def test_command_line_subprocess(base, tmp_path):
    args = with_flags(base, output_dir=tmp_path / "cli", methods=["standard"], num_runs=1, num_ig_pairs=4,
                      max_steps=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "run_clm_igf.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert run_files(out_dir(args)) == ["standard_run000.json"]
    assert os.path.exists(os.path.join(out_dir(args), artifacts.RESULTS))
