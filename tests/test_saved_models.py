"""--save_models: run 0's fine-tuned model of every method as a transformers checkpoint that reloads offline,
reproduces the run's final test perplexity, differs from the base model, and carries a model card; added later to
a finished folder by retraining run 0; and one long IGF fine-tune is a plain command."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import run_clm_igf
from conftest import tiny_flags
from igf import artifacts
from igf.config import parse_args
from igf.information_gain import perplexity

METHODS = ["standard", "igf_constant"]


def set_flag(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = str(value)
    return argv


@pytest.fixture(scope="module")
def saved(tiny_model, text_files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "out"
    argv = tiny_flags(tiny_model, text_files, folder) + ["--methods", *METHODS, "--save_models"]
    assert run_clm_igf.main(argv) == 0
    return argv, str(folder)


def test_the_saved_model_reloads_and_gives_the_recorded_perplexity(saved, tiny_model):
    argv, folder = saved
    cfg = parse_args(argv)
    _, _, sets, _, _ = run_clm_igf.load_model_and_contexts(cfg, torch.device("cpu"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    for method in METHODS:
        path = os.path.join(folder, artifacts.MODELS, method)
        assert {"config.json", "model.safetensors", "generation_config.json", "README.md",
                "tokenizer.json"} <= set(os.listdir(path))
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_model).get_vocab()
        record = artifacts.read_json(os.path.join(folder, artifacts.RUNS, f"{method}_run000.json"))
        ppl = perplexity(model, sets.test, 16, torch.device("cpu"))
        assert ppl == pytest.approx(record["test_ppl"][-1], rel=1e-5)
        moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), base.parameters()))
        assert moved > 1e-4  # fine-tuned, not the base model
        card = open(os.path.join(path, "README.md"), encoding="utf-8").read()
        header = card.split("---")[1]
        assert "library_name: transformers" in header and "- information-gain-filtration" in header
        assert "base_model:" not in header  # a local folder is not a hub model
        for fact in (f"`{method}`", tiny_model, "learning rate 0.001", "3 optimizer steps of 4 contexts",
                     f"{record['test_ppl'][0]:.3f} before", f"{record['test_ppl'][-1]:.3f} after"):
            assert fact in card, fact
    igf_card = open(os.path.join(folder, artifacts.MODELS, "igf_constant", "README.md")).read()
    assert "held-out exact-IG correlation Spearman" in igf_card and "passed z >= 0 at every batch" in igf_card
    assert f'folder = "{os.path.join(argv[argv.index("--output_dir") + 1], artifacts.MODELS, "igf_constant")}"' \
        in igf_card  # the card's snippet names its own folder


def test_save_models_on_finished_runs_retrains_run_zero(saved, tmp_path, capsys):
    argv, _ = saved
    folder = tmp_path / "later"
    plain = [a for a in argv if a != "--save_models"]
    plain = set_flag(plain, "--output_dir", folder)
    assert run_clm_igf.main(plain) == 0
    records = {m: open(folder / artifacts.RUNS / f"{m}_run000.json").read() for m in METHODS}
    assert not os.path.exists(folder / artifacts.MODELS)
    capsys.readouterr()
    assert run_clm_igf.main(plain + ["--save_models"]) == 0
    out = capsys.readouterr().out
    assert all(f"saved {m} run 0" in out for m in METHODS) and "note:" not in out  # deterministic: the same run
    for m in METHODS:
        assert open(folder / artifacts.RUNS / f"{m}_run000.json").read() == records[m]
        assert os.path.exists(folder / artifacts.MODELS / m / "model.safetensors")
    capsys.readouterr()
    assert run_clm_igf.main(plain + ["--save_models"]) == 0  # nothing left to do
    assert "saved " not in capsys.readouterr().out


def test_one_long_igf_fine_tune_is_a_plain_command(tiny_model, text_files, tmp_path):
    folder = tmp_path / "long"
    argv = tiny_flags(tiny_model, text_files, folder)
    argv = set_flag(set_flag(set_flag(argv, "--num_runs", 1), "--max_steps", 40), "--eval_every", 20)
    assert run_clm_igf.main(argv + ["--methods", "igf_shifting", "--save_models"]) == 0
    assert os.listdir(folder / artifacts.RUNS) == ["igf_shifting_run000.json"]  # no standard run unless asked
    record = json.load(open(folder / artifacts.RUNS / "igf_shifting_run000.json"))
    assert len(record["kept_rows"]) == 40 and record["steps"] == [0, 20, 40]
    assert record["thresholds"][0] == 0.5 and record["thresholds"][-1] == -0.5  # strict, then loose
    assert os.path.exists(folder / artifacts.MODELS / "igf_shifting" / "model.safetensors")
    card = open(folder / artifacts.MODELS / "igf_shifting" / "README.md").read()
    assert "passed z >= 0.5 at the first batch, moving to z >= -0.5 by the last" in card
    assert "Overlap: n/a, igf_constant was not run." in open(folder / artifacts.SELECTION_TABLE).read()
    results = json.load(open(folder / artifacts.RESULTS))
    assert results["baseline"] is None and results["methods"]["igf_shifting"]["runs"] == 1
