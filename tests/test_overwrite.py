"""Nothing the user owns is ever overwritten: the filter refuses outputs that would replace its input (or each
other) or lie inside its input folder, the driver an --output_dir inside its input, each in one line before any
work; committed outputs get the umask's permissions, and a failure while committing keeps the old outputs."""
import json
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
                                  "scores in input subfolder", "output is input via symlink",
                                  "output is a file of the input folder via hard link"])
def test_filter_refuses_to_overwrite_its_input(case, corpus, tmp_path, capsys):
    file = os.path.join(corpus, "style_a.txt")
    kept, link = tmp_path / "kept.jsonl", tmp_path / "link.txt"
    os.symlink(file, link)
    hard = tmp_path / "hard.txt"
    os.link(file, hard)
    argv = {"output is input": ["--input", file, "--output", file],
            "scores is input": ["--input", file, "--output", kept, "--scores", file],
            "output is scores": ["--input", file, "--output", kept, "--scores", tmp_path / "." / "kept.jsonl"],
            "output in input": ["--input", corpus, "--output", os.path.join(corpus, "kept.jsonl")],
            "scores in input subfolder": ["--input", corpus, "--output", kept, "--scores",
                                          os.path.join(corpus, "new", "s.jsonl")],
            "output is input via symlink": ["--input", file, "--output", link],
            "output is a file of the input folder via hard link": ["--input", corpus, "--output", hard]}[case]
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


# ----------------------------------------------------------------------------- what save_pretrained replaces


@pytest.fixture(scope="module")
def learner(trained):
    from igf import Learner

    return Learner.from_output_dir(trained[0])


def user_folder(path):
    """A folder of the user's own files (one of them a config.json, as many projects have)."""
    os.makedirs(path / "data")
    (path / "config.json").write_text('{"mine": true}\n')
    (path / "notes.txt").write_text("my notes\n")
    (path / "data" / "x.csv").write_text("1,2\n")
    return path


def test_save_pretrained_refuses_a_folder_it_did_not_write(learner, tmp_path, monkeypatch):
    from igf.errors import IGFError

    mine = user_folder(tmp_path / "mine")
    before = snapshot(mine)
    with pytest.raises(IGFError, match="holds files that were not written by this project") as e:
        learner.save_pretrained(str(mine))
    assert len(str(e.value).splitlines()) == 1 and snapshot(mine) == before
    monkeypatch.chdir(mine)  # the working directory, by any name
    for name in (".", str(mine), os.path.join("data", "..")):
        with pytest.raises(IGFError, match="working directory"):
            learner.save_pretrained(name)
    with pytest.raises(IGFError, match="working directory"):
        learner.save_pretrained(str(tmp_path))  # a folder above it
    with pytest.raises(IGFError, match="not a folder"):
        learner.save_pretrained("notes.txt")
    assert snapshot(mine) == before
    # a learner folder the user added a file to is theirs too
    folder = learner.save_pretrained(str(tmp_path / "learner"))
    (tmp_path / "learner" / "mine.txt").write_text("keep me\n")
    with pytest.raises(IGFError, match="not written by this project"):
        learner.save_pretrained(folder)
    assert (tmp_path / "learner" / "mine.txt").read_text() == "keep me\n"


def test_save_pretrained_replaces_its_own_folder_or_an_empty_one(learner, tmp_path):
    from igf import Learner

    (tmp_path / "empty").mkdir()
    for name in ("empty", "new/deeper"):
        folder = learner.save_pretrained(str(tmp_path / name))
        assert Learner.from_pretrained(folder).context_len == learner.context_len
    weights = (tmp_path / "empty" / "model.safetensors").read_bytes()
    again = Learner.from_pretrained(str(tmp_path / "empty")).save_pretrained(str(tmp_path / "empty"))  # in place
    assert (tmp_path / "empty" / "model.safetensors").read_bytes() == weights and again == str(tmp_path / "empty")


@pytest.mark.parametrize("mask", [0o077, 0o022])
def test_folders_honour_the_umask(mask, learner, tiny_model, text_files, tmp_path):
    from igf import artifacts

    old = os.umask(mask)
    try:
        folder = learner.save_pretrained(str(tmp_path / "learner"))
        artifacts.prepare_output_dir(str(tmp_path / "out"), overwrite=False)
    finally:
        os.umask(old)
    for path in (folder, tmp_path / "out", tmp_path / "out" / "runs"):
        assert os.stat(path).st_mode & 0o777 == 0o777 & ~mask, path
    assert os.stat(os.path.join(folder, "model.safetensors")).st_mode & 0o777 == 0o666 & ~mask


# ----------------------------------------------------------------------------- the filter's outputs vs what it reads


@pytest.mark.parametrize("case", ["weights", "config", "tokenizer via symlink", "weights via hard link",
                                  "new file in the learner folder", "learner file of an output folder",
                                  "output folder's config", "output folder's runs", "the LM's weights"])
def test_filter_refuses_an_output_that_is_a_file_it_reads(case, trained, learner, text_folders, tmp_path, capsys):
    out, _, _ = trained
    folder = learner.save_pretrained(str(tmp_path / "learner"))
    link = tmp_path / "link"
    lm = learner.config["built_on"]["model"]
    target, learner_arg, extra = {
        "weights": (os.path.join(folder, "model.safetensors"), folder, []),
        "config": (os.path.join(folder, "config.json"), folder, []),
        "tokenizer via symlink": (os.path.join(folder, "tokenizer.json"), folder, []),
        "weights via hard link": (os.path.join(folder, "model.safetensors"), folder, []),
        "new file in the learner folder": (os.path.join(folder, "kept.jsonl"), folder, []),
        "learner file of an output folder": (os.path.join(out, "secondary_learner.pt"), out, []),
        "output folder's config": (os.path.join(out, "learner", "config.json"), out, []),
        "output folder's runs": (os.path.join(out, "runs", "kept.jsonl"), out, []),
        "the LM's weights": (os.path.join(lm, "model.safetensors"), out, ["--model_name_or_path", lm]),
    }[case]
    output = target
    if case.endswith("symlink"):
        os.symlink(target, link)
        output = link
    elif case.endswith("hard link"):
        os.link(target, link)
        output = link
    watched = [folder, out, lm]
    before = [snapshot(f) for f in watched]
    expect_error(capsys, [learner_arg, "--input", text_folders["train"], "--output", output, *extra,
                          "--allow_weak_learner"], "write it elsewhere")
    assert [snapshot(f) for f in watched] == before
    # --scores is checked the same way
    expect_error(capsys, [learner_arg, "--input", text_folders["train"], "--output", tmp_path / "k.jsonl",
                          "--scores", output, *extra, "--allow_weak_learner"], "--scores", "write it elsewhere")
    assert [snapshot(f) for f in watched] == before and not os.path.exists(tmp_path / "k.jsonl")


# ----------------------------------------------------------------------------- --overwrite_output_dir


def test_the_driver_never_writes_into_a_folder_of_the_users_files(tiny_model, text_files, tmp_path, monkeypatch,
                                                                   capsys):
    mine = user_folder(tmp_path / "mine")
    before = snapshot(mine)
    monkeypatch.chdir(mine)
    for extra in ([], ["--overwrite_output_dir"]):  # --output_dir . with the user's own config.json
        code = run_clm_igf.main(tiny_flags(tiny_model, text_files, ".") + extra)
        check_error(code, "", capsys.readouterr().err, "--output_dir .", "config.json", "did not write")
        assert snapshot(mine) == before and sorted(os.listdir(mine)) == ["config.json", "data", "notes.txt"]


def test_overwrite_output_dir_removes_only_what_a_run_wrote(tiny_model, text_files, tmp_path):
    from igf import artifacts

    out = tmp_path / "out"
    argv = tiny_flags(tiny_model, text_files, out) + ["--stages", "ig_pairs", "learner"]
    assert run_clm_igf.main(argv) == 0
    assert json.load(open(out / artifacts.MANIFEST))["igf_kind"] == artifacts.OUTPUT_KIND
    (out / "notes.txt").write_text("mine\n")  # the user's files beside the run's
    (out / "mine").mkdir()
    (out / "mine" / "a.txt").write_text("a\n")
    pairs = (out / artifacts.IG_PAIRS).read_bytes()
    assert run_clm_igf.main(argv + ["--overwrite_output_dir", "--num_ig_pairs", "20"]) == 0
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "mine" / "a.txt").read_text() == "a\n"
    assert (out / artifacts.IG_PAIRS).read_bytes() != pairs  # the run's own artifacts were redone
