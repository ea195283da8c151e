"""The learner folder (igf/learner.py) on the tiny model: the driver writes it after the learner stage (again only
when missing or stale); it loads from a copy with the LM gone and scores as windows cut by a plain loop over the
tokenizer and scored by the network's forward pass (and exactly as the filter's --scores); altered weights or a
swapped tokenizer are refused in one line; score_rows maps a datasets.Dataset row by row; the filter on it equals
the filter on the output folder's learner file on its LM; and the filter applies the driver's gate."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import run_clm_igf
from conftest import make_tiny_model, tiny_flags
from igf import Learner, artifacts, filter
from igf.contexts import decode_windows
from igf.errors import IGFError
from igf.learner import CARD, CONFIG, SCORE_COLUMN, WEIGHTS
from igf.secondary_learner import describe_quality, gate_refusal


@pytest.fixture(scope="module")
def trained(text_folders, tmp_path_factory):
    """(output folder, its LM folder, the training lines): a learner trained on a tiny LM of this module's own,
    so that a test can take the LM away."""
    root = tmp_path_factory.mktemp("learner_folder")
    lm = make_tiny_model(root / "lm")
    out = root / "out"
    assert run_clm_igf.main(tiny_flags(lm, text_folders, out) + ["--stages", "ig_pairs", "learner"]) == 0
    lines = [line for name in sorted(os.listdir(text_folders["train"]))
             for line in open(os.path.join(text_folders["train"], name), encoding="utf-8")]
    return str(out), lm, lines


def folder_of(out):
    return os.path.join(out, artifacts.LEARNER_FOLDER)


def cli_scores(folder, lines, tmp_path, *flags):
    """The filter's --scores on a file whose lines are ``lines``, as float32 (the gate has a test of its own)."""
    corpus, scores = tmp_path / "corpus.txt", tmp_path / "scores.jsonl"
    corpus.write_text("".join(lines), encoding="utf-8")
    assert filter.main([str(folder), "--input", str(corpus), "--output", str(tmp_path / "kept.jsonl"),
                        "--scores", str(scores), "--allow_weak_learner", *flags]) == 0
    return np.array([json.loads(line)["score"] for line in open(scores)], dtype=np.float32)


def by_hand(learner, lines):
    """(raw predicted IG, z-scores) of the windows of a file whose lines are ``lines``, computed without the
    filter's code: each line tokenized alone by a plain loop, the tokens concatenated and cut into windows of the
    context length (tail dropped), each window through the network's own forward pass (nn.Conv1d, not the token
    tables), z = (raw - mean) / std with the scale in its config (float64)."""
    ids = [t for line in lines for t in learner.tokenizer(line, add_special_tokens=False)["input_ids"]]
    T = learner.context_len
    n = len(ids) // T
    with torch.no_grad():
        raw = learner.model.eval()(torch.tensor(ids[: n * T]).view(n, T)).double().numpy()
    scale = learner.config["scale"]
    return raw, (raw - scale["mean"]) / scale["std"]


def without_learner_folder(out, tmp_path):
    """A copy of the output folder without its learner/ folder: the filter must load the learner file on its LM."""
    return str(shutil.copytree(out, tmp_path / "bare", ignore=shutil.ignore_patterns(artifacts.LEARNER_FOLDER)))


def one_error_line(capsys, argv, *fragments):
    assert filter.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])


def test_round_trip_without_the_lm(trained, tmp_path, monkeypatch):
    out, lm, lines = trained
    folder = folder_of(out)
    assert {CONFIG, WEIGHTS, CARD, "tokenizer.json"} <= set(os.listdir(folder))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(os.path.join(folder, WEIGHTS)).st_mode & 0o777 == 0o666 & ~umask  # not private
    shared = shutil.copytree(folder, tmp_path / "shared")
    os.rename(lm, lm + ".gone")  # the LM is gone: the folder alone must do
    try:
        def no_pickle(*args, **kwargs):
            raise AssertionError("torch.load used to load a learner folder")
        with monkeypatch.context() as m:
            m.setattr(torch, "load", no_pickle)
            learner = Learner.from_pretrained(str(shared))
        z = learner.score([line.rstrip("\n") for line in lines])  # a list of texts, one per line
        assert z.dtype == np.float32 and len(z) > 100
        _, expected = by_hand(learner, lines)  # computed without the filter's code
        assert len(z) == len(expected) and np.allclose(z, expected, atol=1e-5)
        assert np.unique(np.round(z, 4)).size > 20  # not one score for all
        assert np.array_equal(z, cli_scores(shared, lines, tmp_path))  # the CLI's --scores, to the bit
        assert np.array_equal(learner.score(lines), z)  # with their line breaks: the same lines
        assert np.array_equal(learner.score(["".join(lines)]), z)  # one text of many lines: the same file
        assert learner.quality == describe_quality(learner.metrics) and learner.metrics["n_heldout"] == 16
        # save_pretrained writes the same folder again
        again = learner.save_pretrained(str(tmp_path / "again"))
        assert json.load(open(os.path.join(again, CONFIG))) == json.load(open(os.path.join(shared, CONFIG)))
        assert np.array_equal(Learner.from_pretrained(again).score(lines), z)
    finally:
        os.rename(lm + ".gone", lm)


def test_config_and_card_say_what_it_is(trained, tmp_path):
    out, _, lines = trained
    config = json.load(open(os.path.join(folder_of(out), CONFIG)))
    assert config["igf_kind"] == "igf-secondary-learner" and config["architecture"]["ensemble"] == 3
    assert config["context_len"] == 16 and config["labels"]["estimator"] == "exact"
    assert config["labels"]["num_ig_pairs"] == 24 and config["labels"]["ig_optimizer"] == "adam"
    saved = artifacts.read_torch(os.path.join(out, artifacts.LEARNER))
    assert config["built_on"]["weights"] == saved["built_on"]["model"]["weights"]
    # the scale is the pool's mean and population std of raw predictions: recomputed from the training text
    raw, z = by_hand(Learner.from_pretrained(folder_of(out)), lines)  # the training text: the pool's contexts
    assert config["scale"]["mean"] == pytest.approx(raw.mean(), rel=1e-4, abs=1e-7)
    assert config["scale"]["std"] == pytest.approx(raw.std(), rel=1e-4)
    unsure = np.abs(z) < 1e-4  # too close to the threshold to tell float32 rounding apart
    assert config["pool"]["contexts"] == len(z)
    assert config["pool"]["acceptance_at_zero"] == pytest.approx(float(np.mean(z >= 0)), abs=unsure.mean() + 1e-12)
    card = open(os.path.join(folder_of(out), CARD), encoding="utf-8").read()
    assert card.startswith("---\nlibrary_name: igf\ntags:\n- information-gain-filtration\n")
    assert describe_quality(config["metrics"]) in card and "against exact IG: Spearman" in card
    assert f"{config['pool']['acceptance_at_zero']:.1%} of the {len(z)} training-pool contexts" in card
    assert "from igf import Learner\nlearner = Learner.from_pretrained(" in card
    assert "24 IG labels by the `exact`" in card


def test_the_driver_writes_the_folder_only_when_missing_or_stale(trained, text_folders, tmp_path, capsys):
    out, lm, _ = trained
    copy = shutil.copytree(out, tmp_path / "out")
    argv = tiny_flags(lm, text_folders, copy) + ["--stages", "ig_pairs", "learner"]
    weights = open(os.path.join(folder_of(copy), WEIGHTS), "rb").read()
    capsys.readouterr()
    assert run_clm_igf.main(argv) == 0 and "wrote the learner folder" not in capsys.readouterr().out  # fresh
    shutil.rmtree(folder_of(copy))
    assert run_clm_igf.main(argv) == 0 and "wrote the learner folder" in capsys.readouterr().out  # missing
    assert open(os.path.join(folder_of(copy), WEIGHTS), "rb").read() == weights  # the same bytes again
    assert run_clm_igf.main(argv + ["--learner_epochs", "3"]) == 0  # retrained: the folder was stale
    assert "wrote the learner folder" in capsys.readouterr().out
    assert open(os.path.join(folder_of(copy), WEIGHTS), "rb").read() != weights
    assert np.array_equal(Learner.from_pretrained(folder_of(copy)).model.trainable_state()["members.0.conv.bias"],
                          Learner.from_output_dir(str(copy), model_name_or_path=lm).model.trainable_state()[
                              "members.0.conv.bias"])


def test_altered_weights_or_a_swapped_tokenizer_are_refused(trained, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out, _, lines = trained
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(lines))
    argv = ["--input", corpus, "--output", tmp_path / "k.jsonl"]
    # a weight changed and the file written again (a valid safetensors file)
    edited = shutil.copytree(folder_of(out), tmp_path / "edited")
    tensors = load_file(os.path.join(edited, WEIGHTS))
    tensors["members.1.conv.bias"][0] += 1e-3
    save_file(tensors, os.path.join(edited, WEIGHTS))
    one_error_line(capsys, [edited, *argv], "does not hold the config.json and weights recorded in its config.json")
    with pytest.raises(IGFError, match="altered or damaged"):
        Learner.from_pretrained(edited)
    # one byte of the tensors' data flipped in place
    flipped = shutil.copytree(folder_of(out), tmp_path / "flipped")
    with open(os.path.join(flipped, WEIGHTS), "r+b") as fh:
        fh.seek(-5, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-5, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0xFF]))
    one_error_line(capsys, [flipped, *argv], "altered or damaged")
    # another tokenizer in its place: the same words, other ids
    swapped = shutil.copytree(folder_of(out), tmp_path / "swapped")
    words = sorted(json.load(open(os.path.join(swapped, "tokenizer.json")))["model"]["vocab"], reverse=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(swapped)
    one_error_line(capsys, [swapped, *argv], "is not the one the learner was built with")
    # not a learner folder: an output folder's own config.json is not one
    with pytest.raises(IGFError, match="is not a learner folder .*its learner folder is"):
        Learner.from_pretrained(out)
    one_error_line(capsys, [folder_of(out), *argv, "--context_len", 8], "contexts of 16 tokens", "--context_len 8")
    one_error_line(capsys, [folder_of(out), *argv, "--model_name_or_path", "x"], "is a learner folder")


def test_score_rows_on_a_dataset(trained):
    import datasets

    out, _, lines = trained
    learner = Learner.from_pretrained(folder_of(out))
    rows = ["".join(lines[i:i + k]) for i, k in zip(range(0, 60, 6), (2, 6, 3, 5, 2, 6, 4, 6, 3, 5))]
    rows.append("the king")  # shorter than one context: NaN
    ds = datasets.Dataset.from_dict({"text": rows, "id": list(range(len(rows)))})
    scored = ds.map(learner.score_rows, batched=True, batch_size=4)
    got = np.array(scored[SCORE_COLUMN], dtype=np.float64)
    # independently: each row tokenized alone, its full windows through the network itself (not the token tables)
    expected = []
    for row in rows:
        ids = learner.tokenizer(row, add_special_tokens=False)["input_ids"]
        n = len(ids) // 16
        if n == 0:
            expected.append(math.nan)
            continue
        with torch.no_grad():
            pred = learner.model.eval()(torch.tensor(ids[: 16 * n]).view(n, 16))
        expected.append(((pred - learner.mean) / learner.std).double().mean().item())
    expected = np.array(expected)
    assert np.isnan(got[-1]) and not np.isnan(got[:-1]).any()
    assert np.allclose(got, expected, atol=1e-5, equal_nan=True)
    assert np.unique(np.round(got[:-1], 6)).size > 3  # rows differ: not one score for all
    kept = scored.filter(lambda r: r[SCORE_COLUMN] >= 0)
    assert kept["id"] == [i for i, z in enumerate(got) if z >= 0] and 0 < kept.num_rows < len(rows)
    # another text field, and an empty batch
    body = ds.rename_column("text", "body").map(learner.score_rows, batched=True, fn_kwargs={"text_field": "body"})
    assert np.array_equal(np.array(body[SCORE_COLUMN]), got, equal_nan=True)
    assert learner.score_rows({"text": []}) == {SCORE_COLUMN: []}


def test_the_filter_on_the_folder_equals_the_filter_on_the_output_folder(trained, text_folders, tmp_path):
    """The learner folder (no LM) and the output folder's learner file on its LM (no learner folder: the LM's
    embeddings and the saved weights) give the same bytes."""
    out, lm, _ = trained
    bare = without_learner_folder(out, tmp_path)
    assert Learner.from_output_dir(bare).source == os.path.join(bare, artifacts.LEARNER)  # not a learner folder
    results = {}
    for name, argv in {"learner folder": [folder_of(out)], "output folder": [bare],
                       "output folder on its LM": [bare, "--model_name_or_path", lm]}.items():
        kept, scores, top = (tmp_path / f"{name}.{k}.jsonl" for k in ("kept", "scores", "top"))
        argv += ["--input", text_folders["train"], "--allow_weak_learner"]  # the gate: a test of its own
        assert filter.main([*argv, "--output", str(kept), "--scores", str(scores)]) == 0
        assert filter.main([*argv, "--output", str(top), "--top_fraction", "0.2"]) == 0
        results[name] = [open(p, "rb").read() for p in (kept, scores, top)]
    assert results["learner folder"] == results["output folder"] == results["output folder on its LM"]
    assert all(results["learner folder"])


def test_the_filter_applies_the_gate(trained, tmp_path, capsys):
    out, _, lines = trained
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(lines))
    argv = ["--input", corpus, "--output", tmp_path / "k.jsonl"]

    def with_metrics(name, metrics):  # a folder saved with these metrics (its hash covers them)
        learner = Learner.from_pretrained(folder_of(out))
        learner.config = {**learner.config, "metrics": metrics}
        return learner.save_pretrained(str(tmp_path / name))

    weak = with_metrics("weak", {"n_heldout": 16, "heldout_spearman": 0.1, "heldout_spearman_ci": [-0.4, 0.55]})
    assert gate_refusal(Learner.from_pretrained(weak).metrics, "it")
    one_error_line(capsys, [weak, *argv], f"the secondary learner of {weak} is not better than chance: held-out "
                   "Spearman 0.10 (95 % CI -0.40 to 0.55, n = 16 held-out labels)", "--allow_weak_learner")
    assert not os.path.exists(tmp_path / "k.jsonl")
    assert filter.main([str(a) for a in (weak, *argv, "--allow_weak_learner")]) == 0
    printed = capsys.readouterr().out
    assert "warning (--allow_weak_learner): the secondary learner of" in printed and "held-out Spearman 0.10" in printed
    unmeasured = with_metrics("unmeasured", {"n_heldout": 0, "n_exact": 0})
    one_error_line(capsys, [unmeasured, *argv], "was never scored on held-out labels")
    # a learner whose held-out CI lies above 0 passes, and the filter says how good it is
    good = with_metrics("good", {"n_heldout": 16, "heldout_spearman": 0.8, "heldout_spearman_ci": [0.5, 0.95]})
    assert filter.main([str(a) for a in (good, *argv)]) == 0
    printed = capsys.readouterr().out
    assert "held-out Spearman 0.80 (95 % CI 0.50 to 0.95, n = 16 held-out labels)" in printed
    assert "warning" not in printed


def test_a_loaded_learner_scores_without_transformers_or_scipy(trained):
    """Start-up: loading a learner folder and scoring text imports neither transformers nor scipy (its fast
    tokenizer is read by ``tokenizers`` alone), and gives the scores of the same folder loaded in a process that
    has imported both (its transformers tokenizer then cuts the windows of ``by_hand``)."""
    out, _, lines = trained
    code = ("import json, sys; from igf import Learner; "
            f"z = Learner.from_pretrained({folder_of(out)!r}).score({lines[:40]!r}); "
            "print(json.dumps([sorted(m for m in ('transformers', 'scipy') if m in sys.modules), z.tolist()]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    imported, z = json.loads(done.stdout)
    assert imported == []
    learner = Learner.from_pretrained(folder_of(out))
    _, expected = by_hand(learner, lines[:40])  # the lazily loaded transformers tokenizer, a plain loop
    assert len(z) == len(expected) > 0
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-4)


def test_decoded_windows_are_transformers_batch_decode(trained):
    """The filter's text of a window (one call to the fast backend) is what transformers' batch_decode gives,
    windows cut inside a word included; the lazily loaded transformers tokenizer has the backend's hash."""
    out, _, lines = trained
    learner = Learner.from_pretrained(folder_of(out))
    ids = [t for line in lines[:60] for t in learner.tokenizer(line, add_special_tokens=False)["input_ids"]]
    windows = [ids[i:i + 7] for i in range(0, len(ids) - 7, 5)]  # overlapping, odd lengths: cuts anywhere
    assert decode_windows(windows, learner.text_tokenizer) == learner.tokenizer.batch_decode(windows)
    assert artifacts.tokenizer_sha(learner.tokenizer) == artifacts.tokenizer_sha(learner.text_tokenizer)


def test_tokenizer_files_changed_after_loading_are_refused(trained, tmp_path):
    out, _, _ = trained
    copy = shutil.copytree(folder_of(out), tmp_path / "copy")
    learner = Learner.from_pretrained(str(copy))
    spec = json.loads((copy / "tokenizer.json").read_text())
    spec["added_tokens"] = spec.get("added_tokens", []) + [{"id": 10_000, "content": "<extra>", "single_word": False,
                                                             "lstrip": False, "rstrip": False, "normalized": False,
                                                             "special": True}]
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(IGFError, match="changed after the learner was loaded"):
        learner.tokenizer  # noqa: B018


def test_a_learner_given_a_bare_tokenizers_tokenizer_has_no_transformers_one(trained):
    out, _, lines = trained
    loaded = Learner.from_pretrained(folder_of(out))
    bare = Learner(loaded.model, loaded.text_tokenizer, loaded.config)  # no folder to load transformers' from
    np.testing.assert_array_equal(bare.score(lines[:20]), loaded.score(lines[:20]))
    with pytest.raises(IGFError, match="its transformers tokenizer is unknown"):
        bare.tokenizer  # noqa: B018
