"""Bad input: one clear line, a non-zero exit, and nothing lost.

Every case is driven through the real command line: ``run_clm_igf.main(argv)`` in-process (fast), and a
handful through a subprocess (``python run_clm_igf.py ...``), where a traceback would really be printed. Each
case asserts: exit code != 0; exactly one stderr line starts with ``error:``, it is the last line, and it names
the offending input (a file path or a flag); no ``Traceback``. Most cases point ``--output_dir`` at a copy of a
complete output directory and assert that every byte in it is unchanged afterwards.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import run_clm_igf
from conftest import DRIVER, ROOT, set_flag, tiny_flags
from igf.distributed import LOCK_FILE

# ----------------------------------------------------------------------------- helpers

def snapshot(folder):
    """{relative path: bytes} of every file under ``folder`` (hidden temporary files included), but the lock file:
    it names whichever invocation last held the folder, refused ones included (igf/distributed.py)."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            if name == LOCK_FILE:
                continue
            path = os.path.join(base, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def run_inprocess(argv, capsys):
    code = run_clm_igf.main(argv)  # an uncaught exception fails the test: the in-process form of a traceback
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(argv):
    proc = subprocess.run([sys.executable, DRIVER, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def check_error(code, out, err, *names):
    """The contract: non-zero exit, one ``error:`` line (the last), naming ``names``, no traceback."""
    assert code != 0, out + err
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert err.rstrip("\n").splitlines()[-1] == lines[0], err
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


@pytest.fixture(scope="module")
def complete_dir(tiny_model, text_files, tmp_path_factory):
    """An output directory holding every artifact of a complete tiny run."""
    out = tmp_path_factory.mktemp("complete") / "out"
    assert run_clm_igf.main(tiny_flags(tiny_model, text_files, out)) == 0
    assert os.path.isfile(out / "results.json")
    return out


@pytest.fixture
def existing(complete_dir, tmp_path):
    """A private copy of the complete output directory and the flags that made it."""
    out = tmp_path / "existing"
    shutil.copytree(complete_dir, out)
    return out


def flags_for(tiny_model, text_files, out):
    return tiny_flags(tiny_model, text_files, out)


# ----------------------------------------------------------------------------- flag values

FLAG_CASES = [  # (flag, value(s), subprocess?)
    *[(f, v, False) for f in ("--size_objective_set", "--num_ig_pairs", "--batch_size", "--max_steps", "--num_runs")
      for v in ("0", "-2")],
    ("--learning_rate", "0", False), ("--learning_rate", "-1", False), ("--learning_rate", "nan", True),
    ("--ig_learning_rate", "nan", False),
    ("--constant_threshold", "nan", False), ("--constant_threshold", "inf", False),
    ("--shift_strict", "inf", False),
    ("--context_len", "128", False),  # the tiny model has 64 positions
    ("--size_objective_set", "1000", False),  # more contexts than the validation text has
    ("--learning_rate", "fast", False),  # argparse type error
    # argparse choices: usage line, then our one error line
    ("--shift_schedule", "cosine", True), ("--preset", "huge", False), ("--ig_optimizer", "lion", False),
    ("--methods", "bogus", False),
]


@pytest.mark.parametrize("flag,value,via_subprocess", FLAG_CASES,
                         ids=[f"{f}={v}" for f, v, _ in FLAG_CASES])
def test_bad_flag_value(flag, value, via_subprocess, tiny_model, text_files, existing, capsys):
    before = snapshot(existing)
    argv = set_flag(flags_for(tiny_model, text_files, existing), flag, value)
    code, out, err = run_subprocess(argv) if via_subprocess else run_inprocess(argv, capsys)
    line = check_error(code, out, err, flag)
    if flag in ("--shift_schedule", "--ig_optimizer", "--methods", "--learning_rate") and value.isalpha() \
            and value != "nan":
        assert code == 2 and "usage:" in err  # argparse's usage line precedes our error line
    if flag == "--context_len":
        assert "64" in line
    if flag == "--size_objective_set" and value == "1000":
        assert text_files["validation"] in line
    assert snapshot(existing) == before


# ----------------------------------------------------------------------------- input files

def write_bytes(path, data):
    with open(path, "wb") as fh:
        fh.write(data)
    return str(path)


FILE_CASES = [  # (id, which split, content or None for a missing file, subprocess?)
    ("missing", "train", None, True),
    ("empty", "validation", b"", False),
    ("whitespace", "test", b"  \n\t\n   \n\n", False),
    ("non-utf8", "train", b"the king \xff\xfe speaks \x80 .\n" * 50, True),
    ("shorter-than-a-context", "train", b"the king .\n", False),
]


@pytest.mark.parametrize("case,split,content,via_subprocess", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_text_file(case, split, content, via_subprocess, tiny_model, text_files, existing, tmp_path, capsys):
    path = str(tmp_path / f"bad_{split}.txt")
    if content is not None:
        write_bytes(path, content)
    before = snapshot(existing)
    argv = set_flag(flags_for(tiny_model, text_files, existing), f"--{split}_file", path)
    code, out, err = run_subprocess(argv) if via_subprocess else run_inprocess(argv, capsys)
    check_error(code, out, err, path)
    assert snapshot(existing) == before


def test_bad_input_with_overwrite_deletes_nothing(tiny_model, text_files, existing, tmp_path, capsys):
    """--overwrite_output_dir only empties the directory once model and data have loaded."""
    path = write_bytes(tmp_path / "empty.txt", b"")
    before = snapshot(existing)
    argv = set_flag(flags_for(tiny_model, text_files, existing), "--train_file", path) + ["--overwrite_output_dir"]
    check_error(*run_inprocess(argv, capsys), path)
    assert snapshot(existing) == before


# ----------------------------------------------------------------------------- output directory and model

def test_output_dir_is_a_file(tiny_model, text_files, tmp_path, capsys):
    path = write_bytes(tmp_path / "a_file", b"precious\n")
    code, out, err = run_subprocess(flags_for(tiny_model, text_files, path))
    check_error(code, out, err, "--output_dir", path)
    assert open(path, "rb").read() == b"precious\n"


def test_output_dir_not_writable(tiny_model, text_files, capsys):
    path = "/proc/igf_out"
    code, out, err = run_inprocess(flags_for(tiny_model, text_files, path), capsys)
    check_error(code, out, err, "--output_dir", path)
    assert not os.path.exists(path)


def test_model_path_does_not_exist(text_files, existing, tmp_path, capsys):
    missing = str(tmp_path / "no_such_model")
    before = snapshot(existing)
    code, out, err = run_inprocess(flags_for(missing, text_files, existing), capsys)
    check_error(code, out, err, missing)
    assert snapshot(existing) == before


# ----------------------------------------------------------------------------- corrupt or foreign artifacts

def truncate_to_half(path):
    with open(path, "rb") as fh:
        data = fh.read()
    write_bytes(path, data[: len(data) // 2])


@pytest.mark.parametrize("artifact,via_subprocess", [("ig_pairs.json", True), ("secondary_learner.pt", False),
                                                     ("runs/standard_run001.json", False)])
def test_truncated_artifact(artifact, via_subprocess, tiny_model, text_files, existing, capsys):
    path = os.path.join(existing, artifact)
    truncate_to_half(path)
    before = snapshot(existing)
    argv = flags_for(tiny_model, text_files, existing)
    code, out, err = run_subprocess(argv) if via_subprocess else run_inprocess(argv, capsys)
    line = check_error(code, out, err, path)
    assert "--overwrite_output_dir" in line
    assert snapshot(existing) == before  # the damaged file is left as it is, not silently replaced


@pytest.fixture(scope="module")
def other_model(tiny_model, tmp_path_factory):
    """A second tiny GPT-2: same tokenizer, wider embeddings (n_embd 48 instead of 32)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny_gpt2_wide")
    config = GPT2Config.from_pretrained(tiny_model)
    config.n_embd = 48
    GPT2LMHeadModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return str(folder)


def test_artifacts_of_another_model_are_refused(tiny_model, other_model, text_files, existing, capsys):
    before = snapshot(existing)
    code, out, err = run_inprocess(flags_for(other_model, text_files, existing), capsys)
    check_error(code, out, err, str(existing), "model.embedding_dim: saved 32, now 48", "--overwrite_output_dir")
    assert snapshot(existing) == before


def test_learner_checkpoint_of_another_model_is_refused(tiny_model, other_model, text_files, existing, tmp_path,
                                                        capsys):
    """IG pairs made with the second model, but the learner checkpoint still the first model's."""
    other_out = tmp_path / "other"
    argv = set_flag(flags_for(other_model, text_files, other_out), "--stages", "ig_pairs")
    assert run_inprocess(argv, capsys)[0] == 0
    shutil.copy(other_out / "ig_pairs.json", existing / "ig_pairs.json")
    before = snapshot(existing)
    argv = set_flag(flags_for(other_model, text_files, existing), "--stages", "learner", "finetune", "plot")
    code, out, err = run_inprocess(argv, capsys)
    check_error(code, out, err, str(existing / "secondary_learner.pt"), "model.embedding_dim",
                "--overwrite_output_dir")
    assert snapshot(existing) == before


def test_later_stage_refuses_ig_pairs_of_another_model(tiny_model, other_model, text_files, existing, capsys):
    """--stages learner ... loads the saved IG pairs: they must belong to this model too."""
    os.remove(existing / "secondary_learner.pt")
    before = snapshot(existing)
    argv = set_flag(flags_for(other_model, text_files, existing), "--stages", "learner", "finetune", "plot")
    check_error(*run_inprocess(argv, capsys), str(existing / "ig_pairs.json"), "model.embedding_dim")
    assert snapshot(existing) == before


# ----------------------------------------------------------------------------- incompatible resume

@pytest.mark.parametrize("flag,value,named", [("--context_len", "32", "context_len"),
                                              ("--size_objective_set", "10", "size_objective_set"),
                                              ("--ig_optimizer", "sgd", "ig_optimizer"),
                                              ("--learning_rate", "2e-3", "optim")])
def test_incompatible_resume_is_refused(flag, value, named, tiny_model, text_files, existing, capsys):
    before = snapshot(existing)
    argv = set_flag(flags_for(tiny_model, text_files, existing), flag, value)
    check_error(*run_inprocess(argv, capsys), str(existing), named, "--overwrite_output_dir")
    assert snapshot(existing) == before


def test_overwrite_output_dir_starts_over(tiny_model, text_files, existing, capsys):
    argv = set_flag(flags_for(tiny_model, text_files, existing), "--context_len", "32") + ["--overwrite_output_dir"]
    code, out, err = run_inprocess(argv, capsys)
    assert code == 0, err
    with open(existing / "ig_pairs.json") as fh:
        assert json.load(fh)["fingerprint"]["context_len"] == 32
    with open(existing / "config.json") as fh:
        assert json.load(fh)["data"]["context_len"] == 32
    assert os.path.isfile(existing / "results.json")


# ----------------------------------------------------------------------------- non-finite guard

@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_huge_ig_learning_rate_stops_at_the_pair(optimizer, tiny_model, text_files, tmp_path, capsys):
    out_dir = tmp_path / "out"
    argv = flags_for(tiny_model, text_files, out_dir) + ["--ig_learning_rate", "1e6", "--ig_optimizer", optimizer]
    line = check_error(*run_inprocess(argv, capsys), "--ig_learning_rate")
    assert re.search(r"IG pair \d+", line), line
    assert not os.path.exists(out_dir / "ig_pairs.json")  # nothing non-finite was saved


def test_huge_learning_rate_stops_at_the_step(tiny_model, text_files, existing, capsys):
    shutil.rmtree(existing / "runs")
    os.mkdir(existing / "runs")
    before = snapshot(existing)
    argv = set_flag(flags_for(tiny_model, text_files, existing), "--learning_rate", "1e6")
    line = check_error(*run_inprocess(argv, capsys), "--learning_rate")
    assert re.search(r"step \d+ of \w+ run \d+", line), line
    assert snapshot(existing) == before  # no run record with NaN in it
