"""The reusable filter (python -m igf.filter) on the tiny model: it cuts new text exactly as training does, puts it
on IGF's z scale (filtering the training text at 0 keeps exactly what igf_constant at threshold 0 accepts), keeps
an exact top fraction, reads text, folders and JSONL, writes readable JSONL atomically, refuses every bad input
with one line, and under a two-process launch writes the single-process output."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import run_clm_igf
from conftest import ROOT, make_tiny_model, tiny_flags
from igf import artifacts, assets, contexts, filter
from igf.config import parse_args
from igf.secondary_learner import load_saved_learner, predict
from igf.thresholds import standardize

FILTER = [sys.executable, "-m", "igf.filter"]


@pytest.fixture(scope="module")
def trained(tiny_model, text_folders, tmp_path_factory):
    """An output folder with IG pairs and a learner (no fine-tuning), and its training pool's z scores as IGF's
    selection computes them (the driver's path: the learner file on the LM's embeddings, ``predict``, then
    ``standardize`` with the recorded scale, as ``selection_inputs`` does)."""
    folder = tmp_path_factory.mktemp("filter") / "out"
    argv = tiny_flags(tiny_model, text_folders, folder) + ["--stages", "ig_pairs", "learner"]
    assert run_clm_igf.main(argv) == 0
    cfg = parse_args(argv)
    model, _, sets, _, _ = run_clm_igf.load_model_and_contexts(cfg, torch.device("cpu"))
    path = os.path.join(folder, artifacts.LEARNER)
    saved = artifacts.read_torch(path)
    learner = load_saved_learner(path, saved, model.get_input_embeddings().weight)
    z = standardize(predict(learner, sets.train), saved["scale"]["mean"], saved["scale"]["std"])
    return str(folder), sets, z


def by_hand(folder, sets):
    """The pool's z-scores computed apart from the filter and IGF's scoring: the network's forward pass (nn.Conv1d,
    not the token tables) on every pool context, and the scale recomputed as the pool's mean and population std
    (float64); returned with the recorded scale, for comparison."""
    path = os.path.join(folder, artifacts.LEARNER)
    saved = artifacts.read_torch(path)
    lm, _ = assets.load_pretrained(saved["built_on"]["model"]["model"], torch.float32)
    learner = load_saved_learner(path, saved, lm.get_input_embeddings().weight)
    with torch.no_grad():
        raw = learner.eval()(sets.train).double().numpy()
    return (raw - raw.mean()) / raw.std(), (raw.mean(), raw.std()), saved["scale"]


def run_filter(*argv):
    code = filter.main([str(a) for a in argv])
    return code


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_filtering_the_training_text_keeps_what_igf_constant_accepts(trained, text_folders, tmp_path):
    folder, sets, z = trained
    out, scores = tmp_path / "kept.jsonl", tmp_path / "all.jsonl"
    assert run_filter(folder, "--input", text_folders["train"], "--output", out, "--scores", scores) == 0
    kept = read_jsonl(out)
    every = read_jsonl(scores)
    assert len(every) == len(sets.train)  # the same windows: no training window was a validation or test one
    accepted = [tuple(row) for row, zi in zip(sets.train.tolist(), z.tolist()) if zi >= 0]
    assert [tuple(r["input_ids"]) for r in kept] == accepted  # exactly igf_constant's acceptance, in input order
    assert [r["score"] for r in kept] == [zi for zi in z.tolist() if zi >= 0]
    assert [r["score"] for r in every] == z.tolist()
    # and apart from both: the network's forward pass, the scale recomputed from the pool
    expected, (mean, std), recorded = by_hand(folder, sets)
    assert recorded["mean"] == pytest.approx(mean, rel=1e-4, abs=1e-7) and recorded["std"] == pytest.approx(std,
                                                                                                          rel=1e-4)
    assert np.allclose([r["score"] for r in every], expected, atol=1e-3) and np.std(expected) == pytest.approx(1)
    # where each context came from: the file and 1-based line of its first token
    first = kept[0]
    assert first["file"].endswith(("style_a.txt", "style_b.txt")) and first["line"] >= 1
    line = open(first["file"], encoding="utf-8").readlines()[first["line"] - 1]
    assert first["text"].split()[0] in line.split()
    import datasets

    back = datasets.load_dataset("json", data_files=str(out), split="train")
    assert back.num_rows == len(kept) and set(back.column_names) == {"text", "input_ids", "score", "file", "line"}


def test_top_fraction_is_exact_and_a_threshold_moves_the_cut(trained, text_folders, tmp_path):
    folder, sets, z = trained
    out = tmp_path / "top.jsonl"
    assert run_filter(folder, "--input", text_folders["train"], "--output", out, "--top_fraction", 0.1) == 0
    kept = read_jsonl(out)
    k = -(-len(z) // 10)  # ceil(0.1 n)
    assert len(kept) == k and min(r["score"] for r in kept) >= z.sort(descending=True).values[k - 1].item()
    order = [tuple(r["input_ids"]) for r in kept]
    assert order == [tuple(r) for r, zi in zip(sets.train.tolist(), z.tolist()) if tuple(r) in set(order)]
    strict = tmp_path / "strict.jsonl"
    assert run_filter(folder, "--input", text_folders["train"], "--output", strict, "--threshold", 1.0) == 0
    assert len(read_jsonl(strict)) == int((z >= 1.0).sum())
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary file left behind


def test_jsonl_input_cuts_like_text(trained, text_folders, tmp_path):
    folder, _, _ = trained
    lines = open(os.path.join(text_folders["train"], "style_a.txt"), encoding="utf-8").readlines()
    records = tmp_path / "docs.jsonl"
    records.write_text("".join(json.dumps({"body": line, "id": i}) + "\n" for i, line in enumerate(lines)))
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert run_filter(folder, "--input", records, "--text_field", "body", "--output", a) == 0
    assert run_filter(folder, "--input", os.path.join(text_folders["train"], "style_a.txt"), "--output", b) == 0
    ka, kb = read_jsonl(a), read_jsonl(b)
    assert [r["input_ids"] for r in ka] == [r["input_ids"] for r in kb] and [r["line"] for r in ka] == [
        r["line"] for r in kb]


def test_text_rows_read_any_name_as_text_and_origins_are_valid_utf8(tmp_path):
    """A run's training file named .json is text to the driver (data.read_lines), so to text_rows too; a file name
    with a byte that is not UTF-8 is written as an escape, and the filter's JSON line does not fail on it."""
    name = tmp_path / "train.json"
    name.write_text("not json\n{also not\n", encoding="utf-8")
    assert [t for t, _ in contexts.text_rows([str(name)])] == ["not json\n", "{also not\n"]
    odd = os.fsdecode(bytes(tmp_path) + b"/bad\xff.txt")
    with open(odd, "w", encoding="utf-8") as fh:
        fh.write("the king\n")
    [(_, origin)] = list(contexts.text_rows([odd]))
    assert origin["file"].endswith("bad\\xff.txt")
    out = artifacts.AtomicOutput(str(tmp_path / "o.jsonl"))
    out.write({"score": 1.0, **origin})
    out.close()
    assert json.loads((tmp_path / out.tmp).read_text(encoding="utf-8"))["file"] == origin["file"]


def test_windows_cross_rows_and_skip_empty_ones():
    chunks = [([torch.tensor([1, 2, 3]).numpy(), torch.tensor([], dtype=torch.int32).numpy()], ["r1", "r2"]),
              ([torch.tensor([4, 5]).numpy(), torch.tensor([6, 7, 8, 9, 10]).numpy()], ["r3", "r4"])]
    out = list(contexts.windows(iter(chunks), 4))
    cut = torch.cat([c for c, _ in out]).tolist()
    origins = [o for _, os_ in out for o in os_]
    assert cut == [[1, 2, 3, 4], [5, 6, 7, 8]] and origins == ["r1", "r3"]  # 9, 10: the dropped tail


def expect_error(capsys, argv, *fragments):
    assert filter.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    for fragment in fragments:
        assert fragment in err[-1], (fragment, err[-1])


def test_bad_inputs_are_one_error_line(trained, text_folders, tmp_path, capsys):
    folder, _, _ = trained
    train = text_folders["train"]
    expect_error(capsys, [tmp_path, "--input", train, "--output", tmp_path / "o.jsonl"], "not found", "--stages")
    expect_error(capsys, [tmp_path / "typo", "--input", train, "--output", tmp_path / "o.jsonl"], "typo is not a "
                 "folder", "learner folder or an output folder")
    junk = tmp_path / "junk"
    junk.mkdir()
    torch.save({"hello": 1}, junk / artifacts.LEARNER)
    expect_error(capsys, [junk, "--input", train, "--output", tmp_path / "o.jsonl"], "not a secondary learner")
    expect_error(capsys, [folder, "--input", train, "--output", tmp_path / "o.jsonl", "--context_len", 8],
                 "contexts of 16 tokens", "--context_len 8")
    other = make_tiny_model(tmp_path / "other", seed=5)  # the same architecture and tokenizer, other weights
    expect_error(capsys, [folder, "--input", train, "--output", tmp_path / "o.jsonl", "--model_name_or_path", other],
                 "was built on", "weights")
    empty = tmp_path / "empty.txt"
    empty.write_text("the king\n")
    expect_error(capsys, [folder, "--input", empty, "--output", tmp_path / "o.jsonl"], "no context of 16 tokens")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "the king " * 20}) + "\n" + json.dumps({"body": "x"}) + "\n")
    expect_error(capsys, [folder, "--input", bad, "--output", tmp_path / "o.jsonl"], "line 2", "'text'")
    expect_error(capsys, [folder, "--input", train, "--output", "/proc/o.jsonl"], "cannot write /proc/o.jsonl")
    expect_error(capsys, [folder, "--input", train, "--output", tmp_path / "o.jsonl", "--threshold", 0,
                          "--top_fraction", 0.5], "not both")
    expect_error(capsys, [folder, "--input", tmp_path / "nothing", "--output", tmp_path / "o.jsonl"], "not found")
    assert not os.path.exists(tmp_path / "o.jsonl")  # an error leaves no output, whole or half
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".o.jsonl")]


def test_command_line_as_a_user_types_it(trained, text_folders, tmp_path):
    folder, _, _ = trained
    proc = subprocess.run(FILTER + [folder, "--input", text_folders["train"], "--output", str(tmp_path / "k.jsonl")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "kept " in proc.stdout and "tokens/s" in proc.stdout and "contexts/s" in proc.stderr  # the progress bar


ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


@pytest.mark.skipif(not os.path.exists(ACCELERATE), reason="accelerate's launcher is not installed")
def test_two_processes_write_the_single_process_output(trained, text_folders, tmp_path):
    folder, _, _ = trained
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    # 7 rows per chunk: many rounds, each chunk tokenized by one process, windows across chunks of both
    assert run_filter(folder, "--input", text_folders["train"], "--output", one, "--scores", tmp_path / "s1",
                      "--rows_per_chunk", 7) == 0
    launch = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "igf.filter", folder,
              "--input", text_folders["train"], "--output", str(two), "--scores", str(tmp_path / "s2"),
              "--rows_per_chunk", "7"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launch, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert open(one).read() == open(two).read()
    assert open(tmp_path / "s1").read() == open(tmp_path / "s2").read()
    assert proc.stdout.count("kept ") == 1  # one writer
