"""Nothing the user owns is ever overwritten: the filter refuses outputs that would replace its input (or each
other) or lie inside its input folder, the driver an --output_dir inside its input, each in one line before any
work; committed outputs get the umask's permissions, and a failure while committing keeps the old outputs."""
import os
import shutil

import pytest
import test_filter
from test_bad_input import check_error, snapshot
from test_filter import expect_error, read_jsonl

import run_clm_igf
from conftest import tiny_flags
from igf import filter

trained = test_filter.trained  # its fixture: an output folder with a trained learner


@pytest.fixture
def corpus(text_folders, tmp_path):
    """A private copy of the training folder (a refusal that failed would write into it)."""
    return str(shutil.copytree(text_folders["train"], tmp_path / "corpus"))


@pytest.mark.parametrize("case", ["output is input", "scores is input", "output is scores", "output in input",
                                  "scores in input subfolder", "output is input via symlink"])
def test_filter_refuses_to_overwrite_its_input(case, corpus, tmp_path, capsys):
    file = os.path.join(corpus, "style_a.txt")
    kept, link = tmp_path / "kept.jsonl", tmp_path / "link.txt"
    os.symlink(file, link)
    argv = {"output is input": ["--input", file, "--output", file],
            "scores is input": ["--input", file, "--output", kept, "--scores", file],
            "output is scores": ["--input", file, "--output", kept, "--scores", tmp_path / "." / "kept.jsonl"],
            "output in input": ["--input", corpus, "--output", os.path.join(corpus, "kept.jsonl")],
            "scores in input subfolder": ["--input", corpus, "--output", kept, "--scores",
                                          os.path.join(corpus, "new", "s.jsonl")],
            "output is input via symlink": ["--input", file, "--output", link]}[case]
    before = snapshot(corpus)
    # no learner in this folder: the refusal comes before the learner (or anything else) is loaded
    expect_error(capsys, [tmp_path / "no_learner", *argv], "write it elsewhere" if "input" in case else "two paths")
    assert snapshot(corpus) == before and not os.path.exists(kept) and os.path.islink(link)


@pytest.mark.parametrize("where", ["inside", "is"])
def test_driver_refuses_output_dir_in_its_input(where, tiny_model, text_folders, corpus, capsys):
    out = os.path.join(corpus, "out") if where == "inside" else corpus
    before = snapshot(corpus)
    argv = tiny_flags(tiny_model, {**text_folders, "train": corpus}, out)
    code = run_clm_igf.main(argv)
    _, err = capsys.readouterr()
    check_error(code, "", err, "--output_dir", "--train_file")
    assert code == 2 and snapshot(corpus) == before


def test_driver_refuses_output_dir_that_is_an_input_file(tiny_model, text_files, capsys):
    before = open(text_files["test"], "rb").read()
    code = run_clm_igf.main(tiny_flags(tiny_model, text_files, text_files["test"]))
    check_error(code, "", capsys.readouterr().err, "--output_dir", "--test_file")
    assert open(text_files["test"], "rb").read() == before


def test_outputs_honour_the_umask(trained, text_folders, tmp_path):
    folder, _, _ = trained
    out, scores = tmp_path / "kept.jsonl", tmp_path / "scores.jsonl"
    old = os.umask(0o077)
    try:
        code = filter.main([folder, "--input", text_folders["train"], "--output", str(out), "--scores", str(scores)])
    finally:
        os.umask(old)
    assert code == 0 and read_jsonl(out)
    assert os.stat(out).st_mode & 0o777 == 0o600 and os.stat(scores).st_mode & 0o777 == 0o600


@pytest.fixture
def old_outputs(tmp_path):
    out, scores = tmp_path / "kept.jsonl", tmp_path / "scores.jsonl"
    out.write_bytes(b"old kept\n")
    scores.write_bytes(b"old scores\n")
    return out, scores


def fail_on_call(n, real):
    """``real`` that raises a full disk on its n-th call."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)
    return fake


@pytest.mark.parametrize("step", ["second rename", "fsync"])
def test_a_failed_commit_keeps_the_old_outputs(step, trained, text_folders, old_outputs, tmp_path, capsys,
                                               monkeypatch):
    folder, _, _ = trained
    out, scores = old_outputs
    if step == "second rename":  # the kept contexts are already in place: the first rename is undone
        monkeypatch.setattr(os, "replace", fail_on_call(2, os.replace))
    else:
        monkeypatch.setattr(os, "fsync", fail_on_call(1, os.fsync))
    expect_error(capsys, [folder, "--input", text_folders["train"], "--output", out, "--scores", scores],
                 "No space left on device", str(scores if step == "second rename" else out))
    assert out.read_bytes() == b"old kept\n" and scores.read_bytes() == b"old scores\n"
    assert sorted(os.listdir(tmp_path)) == ["kept.jsonl", "scores.jsonl"]  # no temporary file or backup left
