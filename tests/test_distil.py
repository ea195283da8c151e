"""Distilling a learner ensemble into one learner (igf/distillation.py, Learner.distil, python -m igf.distil) on the
tiny model: the rescaled output is mean + std * the old one; a student ranks like its teacher on contexts it was not
trained on (by the networks' own forward passes and scipy, not the code under test); a student from an output folder
trains on the run's pool and is measured on the run's held-out labels (recomputed here); from other text it is
unmeasured and the gate refuses it; a sample of the pool is still measured; its folder loads and scores as its network
does; and the command refuses, in one line, an --output that would replace what it reads (the source, the run's
artifacts or any run's around it, its train, validation or test text, the input) or the user's files, flags that do not
apply, too little text and a diverging training; and distilling leaves the caller's random generator where it was."""
import os

import pytest
import torch
from scipy.stats import spearmanr

import run_clm_igf
from conftest import make_tiny_model, tiny_flags
from igf import Learner, artifacts, distil
from igf.distillation import rescale_output, student_of
from igf.secondary_learner import build_learner


@pytest.fixture(scope="module")
def run(text_folders, tmp_path_factory):
    """(output folder, training lines): a run whose learner is an ensemble of 3, labels and learner only."""
    root = tmp_path_factory.mktemp("distil")
    lm = make_tiny_model(root / "lm")
    out = root / "out"
    argv = tiny_flags(lm, text_folders, out) + ["--stages", "ig_pairs", "learner", "--learner_ensemble", "3",
                                                 "--num_heldout_pairs", "40"]
    assert run_clm_igf.main(argv) == 0
    lines = [line for name in sorted(os.listdir(text_folders["train"]))
             for line in open(os.path.join(text_folders["train"], name), encoding="utf-8")]
    return str(out), lines


def forward(net, contexts):
    with torch.no_grad():
        return net.eval()(contexts).double()


def test_the_rescaled_output_is_mean_plus_std_times_the_old_one():
    torch.manual_seed(0)
    net = build_learner(torch.randn(30, 8), channels=4, hidden=5).eval()
    x = torch.randint(0, 30, (50, 7))
    before = forward(net, x)
    rescale_output(net, 2.5, 0.25)
    assert torch.allclose(forward(net, x), 2.5 + 0.25 * before, atol=1e-6)


def test_the_student_starts_as_the_first_member_and_is_one_learner():
    torch.manual_seed(0)
    teacher = build_learner(torch.randn(30, 8), ensemble=3, channels=4, hidden=5).eval()
    student = student_of(teacher)
    x = torch.randint(0, 30, (20, 7))
    assert not hasattr(student, "members")
    assert torch.equal(forward(student, x), forward(teacher.members[0], x))


def test_a_student_ranks_like_its_teacher_on_contexts_it_never_saw(run):
    out, lines = run
    teacher = Learner.from_pretrained(os.path.join(out, artifacts.LEARNER_FOLDER))
    state = torch.get_rng_state()
    student = teacher.distil(lines, epochs=30, lr=3e-3, batch_size=32)
    assert torch.equal(state, torch.get_rng_state())  # the caller's generator did not move
    d = student.config["distilled_from"]
    assert d["teacher"]["ensemble"] == 3 and d["contexts"] == d["n_train"] + d["n_val"]
    # fresh contexts in the training text's words, scored by both networks' own forward passes
    g = torch.Generator().manual_seed(1)
    fresh = torch.randint(2, len(teacher.tokenizer), (400, teacher.context_len), generator=g)
    rho = spearmanr(forward(student.model, fresh).numpy(), forward(teacher.model, fresh).numpy()).statistic
    start = spearmanr(forward(student_of(teacher.model), fresh).numpy(), forward(teacher.model, fresh).numpy())
    assert rho > 0.9 and rho > start.statistic, (rho, start.statistic)  # it learned the ensemble, not member 0


def test_from_an_output_folder_it_is_measured_on_the_runs_heldout_labels(run, tmp_path, capsys):
    out, _ = run
    target = tmp_path / "student"
    assert distil.main([out, "--output", str(target), "--epochs", "5", "--batch_size", "32"]) == 0
    assert "measured on the run's held-out labels" in capsys.readouterr().out
    student = Learner.from_pretrained(str(target))
    metrics = student.config["metrics"]
    # recomputed here: the run's held-out labels, their tokens from the run's own pool rows
    pairs = artifacts.read_json(os.path.join(out, artifacts.IG_PAIRS))
    data = run_clm_igf.load_model_and_contexts(run_clm_igf.parse_args(
        ["--output_dir", out] + _data_flags(out)), torch.device("cpu"))[2]
    tokens = torch.stack([data.train[p["context_index"]] for p in pairs["heldout"]])
    expected = spearmanr(forward(student.model, tokens).numpy(), [p["ig"] for p in pairs["heldout"]]).statistic
    assert metrics["n_heldout"] == len(pairs["heldout"]) == 40
    assert metrics["heldout_spearman"] == pytest.approx(expected, abs=1e-9)
    # the folder scores as its network does, on the teacher's z scale
    teacher = Learner.from_pretrained(os.path.join(out, artifacts.LEARNER_FOLDER))
    assert student.config["scale"] == teacher.config["scale"]
    scale = student.config["scale"]
    z = student.z_scores(tokens).double()
    assert torch.allclose(z, (forward(student.model, tokens) - scale["mean"]) / scale["std"], atol=1e-4)
    assert "one learner distilled from an ensemble of 3" in student.describe()
    card = open(target / "README.md", encoding="utf-8").read()
    assert "distilled** from an ensemble of 3" in card


def _train_folder(out):
    return artifacts.read_json(os.path.join(out, artifacts.CONFIG))["data"]["train_file"]


def test_a_sample_of_the_pool_is_still_measured_on_the_runs_labels(run, tmp_path, capsys):
    out, _ = run
    target = tmp_path / "sampled"
    assert distil.main([out, "--output", str(target), "--epochs", "2", "--max_contexts", "200"]) == 0
    assert "a sample of the run's training pool" in capsys.readouterr().out
    student = Learner.from_pretrained(str(target))
    assert student.config["distilled_from"]["contexts"] == 200 and student.config["metrics"]["n_heldout"] == 40
    # distilled again from the student: one learner from one learner, said so
    again = student.distil(torch.randint(2, 20, (300, 16)), epochs=1)
    assert "one learner distilled from one learner" in again.describe()


def _data_flags(out):
    """The data flags of the run in ``out``, from its config.json."""
    d = artifacts.read_json(os.path.join(out, artifacts.CONFIG))["data"]
    return ["--model_name_or_path", d["model_name_or_path"], "--train_file", d["train_file"], "--validation_file",
            d["validation_file"], "--test_file", d["test_file"], "--context_len", str(d["context_len"]),
            "--size_test_set", str(d["size_test_set"]), "--size_objective_set", str(d["size_objective_set"])]


def test_on_other_text_it_is_unmeasured_and_the_gate_refuses_it(run, tmp_path, capsys):
    out, lines = run
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(reversed(lines)), encoding="utf-8")
    target = tmp_path / "student"
    assert distil.main([os.path.join(out, artifacts.LEARNER_FOLDER), "--input", str(corpus), "--output",
                        str(target), "--epochs", "2"]) == 0
    assert "held-out quality not measured" in capsys.readouterr().out
    student = Learner.from_pretrained(str(target))
    assert student.config["metrics"] == {} and "never scored on held-out labels" in student.gate_refusal()
    assert student.config["distilled_from"]["teacher"]["content_sha"] == Learner.from_pretrained(
        os.path.join(out, artifacts.LEARNER_FOLDER)).config["content_sha"]


def one_error_line(capsys, argv, *fragments):
    assert distil.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])


def test_an_output_that_would_replace_what_it_reads_or_the_users_files_is_refused(run, tmp_path, capsys):
    out, lines = run
    folder = os.path.join(out, artifacts.LEARNER_FOLDER)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("".join(lines), encoding="utf-8")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine", encoding="utf-8")
    before = {name: os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder)}
    one_error_line(capsys, [folder, "--input", corpus, "--output", folder], "learner folder")
    one_error_line(capsys, [folder, "--input", corpus, "--output", os.path.join(folder, "x")], "learner folder")
    one_error_line(capsys, [out, "--output", folder], "artifact learner")
    one_error_line(capsys, [out, "--output", os.path.join(out, artifacts.CONFIG)], "artifact config.json")
    one_error_line(capsys, [folder, "--input", corpus, "--output", corpus / "student"], "--input")
    one_error_line(capsys, [folder, "--input", corpus, "--output", mine], "not written by this project")
    one_error_line(capsys, [folder, "--output", tmp_path / "s"], "give --input")
    one_error_line(capsys, [folder, "--input", corpus, "--output", tmp_path / "s", "--val_fraction", "1"],
                   "--val_fraction")
    one_error_line(capsys, [out, "--output", os.path.join(_train_folder(out), "student")], "train text")
    # among the run's text even when the student distils on other text, and however deep
    one_error_line(capsys, [out, "--input", corpus, "--output", os.path.join(_train_folder(out), "a", "student")],
                   "train text")
    # a run's artifact guarded whatever the source: here the run around --output, from a learner folder source
    one_error_line(capsys, [folder, "--input", corpus, "--output", os.path.join(out, artifacts.RUNS)], "artifact runs")
    one_error_line(capsys, [folder, "--input", corpus, "--output", ""], "--output is empty")
    one_error_line(capsys, [folder, "--input", corpus, "--output", tmp_path / "s", "--split", "test"],
                   "--dataset_name only")
    one_error_line(capsys, [folder, "--input", corpus, "--output", tmp_path / "s", "--text_field", "body"],
                   "JSONL --input")
    one_error_line(capsys, [folder, "--input", corpus, "--output", tmp_path / "s", "--pipeline", "1"],
                   "--pipeline applies to an output folder")
    one_error_line(capsys, [folder, "--input", corpus, "--output", tmp_path / "s", "--max_contexts", "10"],
                   "held out")
    one_error_line(capsys, [folder, "--input", corpus, "--output", tmp_path / "s", "--learning_rate", "1e30"],
                   "diverged")
    assert not os.path.exists(os.path.join(_train_folder(out), "student"))
    empty = tmp_path / "empty.txt"
    empty.write_text("the king\n", encoding="utf-8")
    one_error_line(capsys, [folder, "--input", empty, "--output", tmp_path / "s"], "nothing to distil on")
    assert not os.path.exists(tmp_path / "s")
    assert (mine / "notes.txt").read_text(encoding="utf-8") == "mine" and os.listdir(mine) == ["notes.txt"]
    assert before == {name: os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder)}
    with pytest.raises(Exception, match="not one string"):
        Learner.from_pretrained(folder).distil("one long text")
