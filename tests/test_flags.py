"""Every flag that tests/test_pipeline.py does not already exercise changes what the driver does, as seen in the
artifacts it writes. Most tests compare against one shared base run (the tiny flags of conftest.py); a flag that
only affects a later stage reuses the base run's IG pairs (and learner) and reruns just that stage.

Not here: --cache_dir (tests/test_assets.py, through igf.assets.cache_root), --overwrite_output_dir
(tests/test_bad_input.py), and --max_steps, --num_runs, --context_len, --seed, --plot_only, --methods subsets
(tests/test_pipeline.py)."""
import json
import math
import os
import re
import shutil

import pytest
import torch

import run_clm_igf
from conftest import tiny_flags
from igf import artifacts
from igf.config import DEFAULT_METHODS as METHODS
from igf.config import PRESETS, DataConfig, FinetuneConfig, parse_args

IGF = ["igf_constant", "igf_shifting"]


# ----------------------------------------------------------------------------- helpers

def with_flags(args, *switches, **flags):
    """``args`` with each ``name=value`` flag set (replacing an earlier value; a list gives several values) and
    each switch (``"--no-standardize_scores"``) appended."""
    out = list(args)
    for name, value in flags.items():
        flag = f"--{name}"
        if flag in out:  # drop the flag and its values
            i = j = out.index(flag)
            j += 1
            while j < len(out) and not out[j].startswith("--"):
                j += 1
            del out[i:j]
        out += [flag, *([str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)])]
    return out + list(switches)


def out_dir(args):
    return args[args.index("--output_dir") + 1]


def read_bytes(folder, name):
    with open(os.path.join(folder, name), "rb") as fh:
        return fh.read()


def load(folder, name):
    return artifacts.read_json(os.path.join(folder, name))


def load_learner(folder):
    return torch.load(os.path.join(folder, artifacts.LEARNER), map_location="cpu", weights_only=True)


def runs_of(folder, method, num_runs=2):
    return [load(folder, os.path.join(artifacts.RUNS, f"{method}_run{r:03d}.json")) for r in range(num_runs)]


def run_ok(args):
    assert run_clm_igf.main(args) == 0
    return out_dir(args)


def run_refused(args, capsys):
    """Exit status 2 and the last stderr line (the one ``error:`` line)."""
    capsys.readouterr()
    assert run_clm_igf.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err[-5:]
    return err[-1]


def rerun(base, folder, *switches, reuse=(artifacts.IG_PAIRS, artifacts.LEARNER), **flags):
    """Run the driver with changed flags in a fresh ``folder`` that starts with copies of some base artifacts."""
    os.makedirs(folder)
    for name in reuse:
        shutil.copy2(os.path.join(out_dir(base), name), folder)
    return run_ok(with_flags(base, *switches, output_dir=folder, **flags))


def ig_values(pairs):
    return [p["ig"] for p in pairs["pairs"]]


@pytest.fixture(scope="module")
def base(tiny_model, text_files, tmp_path_factory):
    """One complete run with the tiny flags: every other run here is compared with it."""
    args = tiny_flags(tiny_model, text_files, tmp_path_factory.mktemp("flags_base") / "out")
    run_ok(args)
    return args


@pytest.fixture
def offline(monkeypatch):
    """The hub's offline mode (what HF_HUB_OFFLINE=1 gives a fresh process): no network retries."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# ----------------------------------------------------------------------------- data

def test_size_objective_set_changes_the_ig_measurement(base, tmp_path):
    folder = rerun(base, tmp_path / "obj", reuse=(), stages="ig_pairs", size_objective_set=4)
    pairs, ref = load(folder, artifacts.IG_PAIRS), load(out_dir(base), artifacts.IG_PAIRS)
    assert pairs["fingerprint"]["size_objective_set"] == 4 and ref["fingerprint"]["size_objective_set"] == 8
    assert pairs["fingerprint"]["objective"] != ref["fingerprint"]["objective"]
    # the same training contexts, measured against another objective set
    assert [p["context_index"] for p in pairs["pairs"]] == [p["context_index"] for p in ref["pairs"]]
    assert pairs["fingerprint"]["train"] == ref["fingerprint"]["train"]
    assert pairs["ppl_before"] != ref["ppl_before"]
    assert all(a != b for a, b in zip(ig_values(pairs), ig_values(ref)))


def test_size_test_set_changes_test_perplexity(base, tmp_path):
    folder = rerun(base, tmp_path / "test8", stages="finetune", methods="standard", size_test_set=8)
    for small, full in zip(runs_of(folder, "standard"), runs_of(out_dir(base), "standard")):
        assert small["train_loss"] == full["train_loss"]  # the same training ...
        assert all(a != b for a, b in zip(small["test_ppl"], full["test_ppl"]))  # ... judged on other contexts


def test_size_test_set_zero_uses_every_test_context(base, text_files, tiny_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from igf.data import cut_contexts, load_raw_splits, tokenize_splits
    from igf.information_gain import perplexity

    capsys.readouterr()
    folder = rerun(base, tmp_path / "test0", stages="finetune", methods="standard", size_test_set=0)
    out = capsys.readouterr().out
    corpus = tokenize_splits(load_raw_splits(text_files["train"], text_files["validation"], text_files["test"]),
                             AutoTokenizer.from_pretrained(tiny_model))
    every = cut_contexts(corpus.ids["test"], 16)
    assert len(every) > 16  # more than the base run's --size_test_set
    assert re.search(rf"test contexts\s+{len(every)} x 16 tokens", out), out
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    expected = perplexity(model, every, 16, torch.device("cpu"))  # pretrained perplexity of the whole test text
    for record in runs_of(folder, "standard"):
        assert record["test_ppl"][0] == pytest.approx(expected, rel=1e-9)


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)


@pytest.fixture(scope="module")
def local_dataset(text_files, tmp_path_factory):
    """A dataset folder (as load_dataset reads a hub repository) with configurations 'a' and 'b', each with
    train/validation/test splits and columns 'body' and 'text'. The conftest texts (line by line, line breaks
    kept, as the text files are read) are column 'body' of 'a' and column 'text' of 'b'; the other column holds
    the same lines in reverse order (other contexts)."""
    folder = tmp_path_factory.mktemp("local_dataset")
    readme = ["---", "configs:"]
    for config in ("a", "b"):
        readme += [f"- config_name: {config}", "  data_files:"]
        for split in ("train", "validation", "test"):
            with open(text_files[split], encoding="utf-8") as fh:
                lines = fh.read().splitlines(keepends=True)
            real, other = ("body", "text") if config == "a" else ("text", "body")
            write_jsonl(folder / config / f"{split}.jsonl",
                        [{real: line, other: rev} for line, rev in zip(lines, reversed(lines))])
            readme += [f"  - split: {split}", f"    path: {config}/{split}.jsonl"]
    (folder / "README.md").write_text("\n".join(readme + ["---", ""]), encoding="utf-8")
    return str(folder)


def hub_flags(base, local_dataset, folder, **flags):
    """The base flags reading --dataset_name instead of the three text files, IG pairs only."""
    args = list(base)
    for name in ("--train_file", "--validation_file", "--test_file"):
        i = args.index(name)
        del args[i:i + 2]
    return with_flags(args, output_dir=folder, dataset_name=local_dataset, stages="ig_pairs", **flags)


@pytest.mark.parametrize("config,column,same_text", [("a", "body", True), ("b", "text", True),
                                                      ("a", "text", False), ("b", "body", False)])
def test_dataset_name_config_and_text_column(config, column, same_text, base, local_dataset, offline, tmp_path):
    """--dataset_name reads the folder, --dataset_config_name picks the configuration, --text_column the column
    (even when another column is called 'text'): only the right pair sees the base run's text."""
    folder = run_ok(hub_flags(base, local_dataset, tmp_path / "hub", dataset_config_name=config,
                              text_column=column))
    pairs, ref = load(folder, artifacts.IG_PAIRS), load(out_dir(base), artifacts.IG_PAIRS)
    assert pairs["fingerprint"]["data"] == [local_dataset, config, None]  # no --source_column
    if same_text:  # the same contexts (the same pool) and information gains as the base run's text files
        assert pairs["fingerprint"]["train"] == ref["fingerprint"]["train"]
        assert [p["context_index"] for p in pairs["pairs"]] == [p["context_index"] for p in ref["pairs"]]
        assert ig_values(pairs) == ig_values(ref) and pairs["ppl_before"] == ref["ppl_before"]
    else:
        assert pairs["fingerprint"]["train"] != ref["fingerprint"]["train"]


def test_missing_text_column_is_refused(base, local_dataset, offline, tmp_path, capsys):
    line = run_refused(hub_flags(base, local_dataset, tmp_path / "col", dataset_config_name="a",
                                 text_column="no_such_column"), capsys)
    assert "no_such_column" in line and "--text_column" in line


def test_unknown_hub_dataset_fails_fast(base, offline, tmp_path, capsys):
    import time

    name = "no-such-org/no-such-dataset-igf"
    args = hub_flags(base, name, tmp_path / "hub")
    start = time.perf_counter()
    line = run_refused(args, capsys)
    assert time.perf_counter() - start < 30
    assert name in line
    assert not os.path.exists(os.path.join(out_dir(args), artifacts.IG_PAIRS))


# ----------------------------------------------------------------------------- information gain

def ig_run(base, folder, **flags):
    return load(rerun(base, folder, reuse=(), stages="ig_pairs", **flags), artifacts.IG_PAIRS)


def test_num_ig_pairs_sets_the_pair_count(base, tmp_path):
    pairs, ref = ig_run(base, tmp_path / "n6", num_ig_pairs=6), load(out_dir(base), artifacts.IG_PAIRS)
    assert len(pairs["pairs"]) == pairs["stats"]["n"] == 6 and len(ref["pairs"]) == 24
    strip = lambda ps: [{k: v for k, v in p.items() if k != "ig_z"} for p in ps]  # noqa: E731 (z-scores differ)
    assert strip(pairs["pairs"]) == strip(ref["pairs"][:6])  # a prefix of the base run's pairs


def test_ig_optimizer_sgd_differs_from_adam(base, tmp_path):
    pairs, ref = ig_run(base, tmp_path / "sgd", ig_optimizer="sgd"), load(out_dir(base), artifacts.IG_PAIRS)
    assert pairs["fingerprint"]["ig_optimizer"] == "sgd" and ref["fingerprint"]["ig_optimizer"] == "adam"
    assert [p["context_index"] for p in pairs["pairs"]] == [p["context_index"] for p in ref["pairs"]]
    assert pairs["ppl_before"] == ref["ppl_before"]
    assert all(a != b for a, b in zip(ig_values(pairs), ig_values(ref)))


def test_ig_learning_rate_scales_information_gain(base, tmp_path):
    pairs = ig_run(base, tmp_path / "lr", ig_learning_rate=1e-4)  # the base run's is 1e-3
    ref = load(out_dir(base), artifacts.IG_PAIRS)
    assert pairs["fingerprint"]["ig_learning_rate"] == 1e-4
    assert all(a != b for a, b in zip(ig_values(pairs), ig_values(ref)))
    # a smaller step changes the objective perplexity less
    assert sum(map(abs, ig_values(pairs))) < sum(map(abs, ig_values(ref)))


def spy_perplexity(monkeypatch, *modules):
    """Record the batch size of every perplexity evaluation made through ``modules``."""
    from igf import information_gain

    sizes, perplexity = [], information_gain.perplexity

    def spy(model, contexts, batch_size, device):
        sizes.append(batch_size)
        return perplexity(model, contexts, batch_size, device)

    for module in modules:
        monkeypatch.setattr(module, "perplexity", spy)
    return sizes


def test_ig_eval_batch_size_only_changes_batching(base, tmp_path, monkeypatch):
    from igf import estimators, pipelines

    sizes = spy_perplexity(monkeypatch, pipelines, estimators)
    pairs, ref = ig_run(base, tmp_path / "bs3", ig_eval_batch_size=3), load(out_dir(base), artifacts.IG_PAIRS)
    assert sizes == [3] * (1 + 24 + 16 + 8)  # before any step, then after the step on 24 pairs, 16 held out, 8 exact
    assert pairs["ppl_before"] == pytest.approx(ref["ppl_before"], rel=1e-5)
    # IG is a difference of two perplexities: compare it on the scale of the perplexities it comes from
    assert ig_values(pairs) == pytest.approx(ig_values(ref), rel=1e-5, abs=1e-5 * ref["ppl_before"])
    assert [p["context_ppl"] for p in pairs["pairs"]] == pytest.approx([p["context_ppl"] for p in ref["pairs"]],
                                                                       rel=1e-5)


def test_ig_save_every_sets_the_checkpoint_interval(base, tmp_path, monkeypatch):
    writes, write_json = [], artifacts.write_json

    def counting(path, obj):
        if os.path.basename(path) == artifacts.IG_PAIRS:
            writes.append((len(obj["pairs"]), len(obj["heldout"]), len(obj["validation"]), obj["complete"]))
        write_json(path, obj)

    monkeypatch.setattr(artifacts, "write_json", counting)
    pairs = ig_run(base, tmp_path / "every5", ig_save_every=5)  # 24 pairs
    # 24 labelled pairs, then 16 held-out ones, then 8 exact validation pairs, then the complete record
    assert writes == [(5, 0, 0, False), (10, 0, 0, False), (15, 0, 0, False), (20, 0, 0, False), (24, 0, 0, False),
                      (24, 5, 0, False), (24, 10, 0, False), (24, 15, 0, False), (24, 16, 0, False),
                      (24, 16, 5, False), (24, 16, 8, False), (24, 16, 8, True)]
    writes.clear()
    ig_run(base, tmp_path / "every7", ig_save_every=7)
    assert writes == [(7, 0, 0, False), (14, 0, 0, False), (21, 0, 0, False), (24, 0, 0, False), (24, 7, 0, False),
                      (24, 14, 0, False), (24, 16, 0, False), (24, 16, 7, False), (24, 16, 8, False),
                      (24, 16, 8, True)]
    # checkpointing does not change the result
    assert artifacts.dumps(pairs) == read_bytes(out_dir(base), artifacts.IG_PAIRS).decode()


# ----------------------------------------------------------------------------- secondary learner

EMBED = 32  # the tiny model's embedding width


def learner_run(base, folder, *switches, **flags):
    """Train the learner alone on the base run's IG pairs: (checkpoint, metrics file)."""
    folder = rerun(base, folder, *switches, reuse=(artifacts.IG_PAIRS,), stages="learner", **flags)
    assert not os.listdir(os.path.join(folder, artifacts.RUNS))  # no fine-tuning in the learner stage
    return load_learner(folder), load(folder, artifacts.LEARNER_METRICS)


def shapes(state):
    """Tensor shapes of a learner's state; of an ensemble, its first member's (every member has the same)."""
    return {k.removeprefix("members.0."): tuple(v.shape) for k, v in state.items()
            if not k.startswith("members.") or k.startswith("members.0.")}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


LEARNER_SHAPES = [  # (flag, value, expected shapes of the trainable tensors)
    ("learner_channels", 5, {"conv.weight": (5, EMBED, 3), "conv.bias": (5,), "head.0.weight": (32, 5)}),
    ("learner_kernel_size", 5, {"conv.weight": (64, EMBED, 5), "conv.bias": (64,)}),
    ("learner_hidden", 7, {"head.0.weight": (7, 64), "head.0.bias": (7,), "head.3.weight": (1, 7)}),
    ("learner_pooling", "mean_max", {"conv.weight": (64, EMBED, 3), "head.0.weight": (32, 128)}),  # max and mean
    ("learner_token_features", True, {"conv.weight": (64, EMBED + 2, 3)}),  # two frozen per-token channels
]


@pytest.mark.parametrize("flag,value,expected", LEARNER_SHAPES, ids=[c[0] for c in LEARNER_SHAPES])
def test_learner_architecture_flags_shape_the_checkpoint(flag, value, expected, base, tmp_path):
    switch = value is True  # a boolean flag is a switch: --learner_token_features
    switches, flags = ([f"--{flag}"], {}) if switch else ([], {flag: value})
    saved, _ = learner_run(base, tmp_path / flag, *switches, **flags)
    got, ref = shapes(saved["state"]), shapes(load_learner(out_dir(base))["state"])
    assert {k: got[k] for k in expected} == expected
    assert ref["conv.weight"] == (64, EMBED, 3) and ref["head.0.weight"] == (32, 64)
    assert not any(k.startswith(("embed.", "features.")) for k in got)  # frozen tables are rebuilt, not saved
    arch = {"learner_channels": "channels", "learner_kernel_size": "kernel_size", "learner_hidden": "hidden",
            "learner_pooling": "pooling"}
    if flag in arch:
        assert saved["arch"][arch[flag]] == value
    assert saved["fingerprint"]["learner"][flag] == value


LEARNER_TRAINING = [("learner_dropout", 0.5), ("learner_epochs", 2), ("learner_learning_rate", 1e-3),
                    ("learner_batch_size", 4), ("learner_val_fraction", 0.5), ("learner_weight_decay", 0.5)]


@pytest.mark.parametrize("flag,value", LEARNER_TRAINING, ids=[c[0] for c in LEARNER_TRAINING])
def test_learner_training_flags_change_the_learner(flag, value, base, tmp_path):
    saved, metrics = learner_run(base, tmp_path / flag, **{flag: value})
    ref_saved, ref = load_learner(out_dir(base)), load(out_dir(base), artifacts.LEARNER_METRICS)
    assert saved["fingerprint"]["learner"][flag] == value
    assert saved["metrics"] == metrics
    assert shapes(saved["state"]) == shapes(ref_saved["state"])
    assert not same_state(saved["state"], ref_saved["state"])
    assert metrics != ref
    if flag == "learner_dropout":
        assert saved["arch"]["dropout"] == 0.5 and ref_saved["arch"]["dropout"] == 0.1
    if flag == "learner_epochs":
        assert ref["best_epoch"] > 2  # so stopping after 2 epochs must change the kept checkpoint
        assert 0 <= metrics["best_epoch"] <= 2
    if flag == "learner_val_fraction":  # round(24 * 0.5) held out, against round(24 * 0.2) in the base run
        assert (metrics["n_train"], metrics["n_val"]) == (12, 12) and (ref["n_train"], ref["n_val"]) == (19, 5)
    else:
        assert (metrics["n_train"], metrics["n_val"]) == (ref["n_train"], ref["n_val"])


# ----------------------------------------------------------------------------- fine-tuning

def finetune(base, folder, methods, *switches, **flags):
    """Fine-tune ``methods`` with changed flags, from the base run's IG pairs and learner: {method: records}."""
    folder = rerun(base, folder, *switches, stages="finetune", methods=methods, **flags)
    return {m: runs_of(folder, m) for m in methods}


def base_runs(base, method):
    return runs_of(out_dir(base), method)


def test_batch_size_sets_contexts_per_step(base, tmp_path):
    runs = finetune(base, tmp_path / "bs2", METHODS, batch_size=2)
    for method in METHODS:
        for record, ref in zip(runs[method], base_runs(base, method)):
            assert record["batch_size"] == 2 and ref["batch_size"] == 4
            assert len(record["candidates_drawn"]) == 3 and all(d >= 2 for d in record["candidates_drawn"])
    assert all(r["candidates_drawn"] == [2, 2, 2] for r in runs["standard"])
    assert all(r["candidates_drawn"] == [4, 4, 4] for r in base_runs(base, "standard"))
    assert any(d > 2 for m in IGF for r in runs[m] for d in r["candidates_drawn"])  # the filter rejected some


@pytest.mark.parametrize("flag,value", [("learning_rate", 1e-4), ("weight_decay", 1.0)])
def test_optimizer_flags_change_the_curves(flag, value, base, tmp_path):
    runs = finetune(base, tmp_path / flag, ["standard"], **{flag: value})
    for record, ref in zip(runs["standard"], base_runs(base, "standard")):
        assert record["test_ppl"][0] == ref["test_ppl"][0]  # the same pretrained model ...
        assert record["train_loss"][0] == ref["train_loss"][0]  # ... and the same first batch
        assert all(a != b for a, b in zip(record["test_ppl"][1:], ref["test_ppl"][1:]))
        assert record["train_loss"][1:] != ref["train_loss"][1:]
        if flag == "learning_rate":  # smaller steps move the test perplexity less
            assert abs(record["test_ppl"][-1] - record["test_ppl"][0]) < abs(ref["test_ppl"][-1] - ref["test_ppl"][0])


def test_warmup_steps_start_with_smaller_steps(base, tmp_path):
    runs = finetune(base, tmp_path / "warmup", ["standard"], warmup_steps=2)
    for record, ref in zip(runs["standard"], base_runs(base, "standard")):
        start = ref["test_ppl"][0]
        assert record["test_ppl"][0] == start
        assert abs(record["test_ppl"][1] - start) < abs(ref["test_ppl"][1] - start)
        assert all(a != b for a, b in zip(record["test_ppl"][2:], ref["test_ppl"][2:]))


def test_eval_every_sets_the_evaluated_steps(base, tmp_path):
    runs = finetune(base, tmp_path / "every2", METHODS, eval_every=2)
    for method in METHODS:
        for record, ref in zip(runs[method], base_runs(base, method)):
            assert record["steps"] == [0, 2, 3] and ref["steps"] == [0, 1, 2, 3]
            # evaluating less often does not change training: the same values at the steps evaluated
            assert record["test_ppl"] == [ref["test_ppl"][i] for i in (0, 2, 3)]
            assert record["train_loss"] == ref["train_loss"]


def test_eval_batch_size_only_changes_batching(base, tmp_path, monkeypatch):
    from igf import finetune as finetune_module

    sizes = spy_perplexity(monkeypatch, run_clm_igf, finetune_module)
    runs = finetune(base, tmp_path / "evalbs", ["standard"], eval_batch_size=5)  # 16 test contexts: 5+5+5+1
    assert sizes == [5] * 7  # the pretrained model once, then 3 steps x 2 runs
    for record, ref in zip(runs["standard"], base_runs(base, "standard")):
        assert record["steps"] == ref["steps"] and record["train_loss"] == ref["train_loss"]
        assert record["test_ppl"] == pytest.approx(ref["test_ppl"], rel=1e-5)


def test_constant_threshold_sets_the_igf_constant_filter(base, tmp_path):
    runs = finetune(base, tmp_path / "const", ["igf_constant"], constant_threshold=0.5)
    refs = base_runs(base, "igf_constant")
    for record, ref in zip(runs["igf_constant"], refs):
        assert record["thresholds"] == [0.5] * 3 and ref["thresholds"] == [0.0] * 3
        # the same candidate stream through a stricter filter: never fewer candidates drawn
        assert sum(record["candidates_drawn"]) >= sum(ref["candidates_drawn"])
    assert sum(sum(r["candidates_drawn"]) for r in runs["igf_constant"]) > sum(
        sum(r["candidates_drawn"]) for r in refs)


# base flags: --shift_strict 0.5 --shift_loose -0.5 --shift_batches 1, 3 steps (thresholds of batches 0, 1, 2)
SHIFT_CASES = [  # (id, flags, expected thresholds)
    ("base", {}, [0.5, -0.5, -0.5]),
    ("schedule=step", dict(shift_schedule="step", shift_batches=2), [0.5, 0.5, -0.5]),
    ("schedule=linear", dict(shift_schedule="linear", shift_batches=2), [0.5, 0.0, -0.5]),
    ("schedule=exponential", dict(shift_schedule="exponential", shift_batches=2),
     [-0.5 + math.exp(-b / 2) for b in range(3)]),
    ("shift_strict", dict(shift_strict=1.0), [1.0, -0.5, -0.5]),
    ("shift_loose", dict(shift_loose=-1.0), [0.5, -1.0, -1.0]),
    ("shift_batches", dict(shift_batches=3), [0.5, 0.5, 0.5]),
]


@pytest.mark.parametrize("flags,expected", [c[1:] for c in SHIFT_CASES], ids=[c[0] for c in SHIFT_CASES])
def test_shifting_threshold_flags(flags, expected, base, tmp_path):
    from igf.thresholds import threshold_schedule

    if flags:
        records = finetune(base, tmp_path / "shift", ["igf_shifting"], **flags)["igf_shifting"]
    else:
        records = base_runs(base, "igf_shifting")
    cfg = parse_args(with_flags(base, **flags)).finetune
    fn = threshold_schedule("igf_shifting", cfg.constant_threshold, cfg.shift_schedule, cfg.shift_strict,
                            cfg.shift_loose, cfg.shift_batches)
    assert [fn(b) for b in range(3)] == pytest.approx(expected, abs=1e-12)
    for record, ref in zip(records, base_runs(base, "igf_shifting")):
        assert record["thresholds"] == pytest.approx(expected, abs=1e-12)
        if flags.get("shift_strict"):  # a stricter first batch draws at least as many candidates
            assert record["candidates_drawn"][0] >= ref["candidates_drawn"][0]
        if flags.get("shift_loose"):  # the first batch's threshold is unchanged: the same draws
            assert record["candidates_drawn"][0] == ref["candidates_drawn"][0]
    if flags:  # another filter: other candidates kept in some run
        assert [(r["candidates_drawn"], r["train_loss"]) for r in records] != [
            (r["candidates_drawn"], r["train_loss"]) for r in base_runs(base, "igf_shifting")]


def test_standardize_scores_switch(base, tmp_path):
    assert parse_args(with_flags(base, "--no-standardize_scores")).finetune.standardize_scores is False
    assert parse_args(with_flags(base, "--no-standardize_scores", "--standardize_scores")
                      ).finetune.standardize_scores is True
    runs = finetune(base, tmp_path / "raw", IGF, "--no-standardize_scores")
    for method in IGF:
        for record, ref in zip(runs[method], base_runs(base, method)):
            assert record["thresholds"] == ref["thresholds"]  # the same thresholds, on another scale
            assert record["fingerprint"]["optim"][8] is False and ref["fingerprint"]["optim"][8] is True
        # another scale of the scores: other candidates kept in some run
        assert [(r["candidates_drawn"], r["train_loss"]) for r in runs[method]] != [
            (r["candidates_drawn"], r["train_loss"]) for r in base_runs(base, method)]


def test_min_acceptance_refuses_a_starving_threshold(base, tmp_path, capsys):
    folder = tmp_path / "starve"
    os.makedirs(folder)
    for name in (artifacts.IG_PAIRS, artifacts.LEARNER):
        shutil.copy2(os.path.join(out_dir(base), name), folder)
    line = run_refused(with_flags(base, output_dir=folder, min_acceptance=0.99), capsys)
    assert "--min_acceptance 0.99" in line
    assert not os.listdir(os.path.join(folder, artifacts.RUNS))  # refused before any run


def test_mixed_precision_bf16_autocasts_the_training_forward_only(base, tmp_path, monkeypatch):
    from igf import finetune as finetune_module

    seen, lm_loss = [], finetune_module.lm_loss

    def spy(model, ids):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return lm_loss(model, ids)

    monkeypatch.setattr(finetune_module, "lm_loss", spy)
    runs = finetune(base, tmp_path / "amp", METHODS, mixed_precision="bf16")
    assert len(seen) == 6 * 3 and all(seen)  # every training forward (6 runs x 3 steps) under bf16 autocast
    for method in METHODS:
        for record, ref in zip(runs[method], base_runs(base, method)):
            assert record["fingerprint"]["optim"][9] == "bf16" and ref["fingerprint"]["optim"][9] == "no"
            assert record["train_loss"] != ref["train_loss"]  # bf16 matmuls in the forward pass
            assert record["test_ppl"][0] == ref["test_ppl"][0]  # evaluation stays in full precision


def test_torch_dtype_bfloat16_fine_tunes_in_bf16_but_measures_ig_in_float32(base, tmp_path, monkeypatch):
    dtypes, finetune_run = [], run_clm_igf.finetune_run

    def spy(model, *args, **kwargs):
        dtypes.append({p.dtype for p in model.parameters()})
        return finetune_run(model, *args, **kwargs)

    monkeypatch.setattr(run_clm_igf, "finetune_run", spy)
    folder = run_ok(with_flags(base, output_dir=tmp_path / "bf16", torch_dtype="bfloat16"))
    assert dtypes == [{torch.bfloat16}] * 6  # 2 runs x 3 methods
    assert read_bytes(folder, artifacts.IG_PAIRS) == read_bytes(out_dir(base), artifacts.IG_PAIRS)
    for method in METHODS:
        for record, ref in zip(runs_of(folder, method), base_runs(base, method)):
            assert record["fingerprint"]["optim"][7] == "bfloat16"
            assert all(math.isfinite(v) and v > 1 for v in record["test_ppl"] + record["train_loss"])
            assert record["test_ppl"] != ref["test_ppl"]  # bf16 weights give other numbers
    results = load(folder, artifacts.RESULTS)
    assert all(math.isfinite(s["final_test_ppl"]["mean"]) for s in results["methods"].values())


# ----------------------------------------------------------------------------- run

def test_device_cpu(base, tmp_path, capsys):
    capsys.readouterr()
    pairs = ig_run(base, tmp_path / "cpu", device="cpu")
    assert re.search(r"device\s+cpu", capsys.readouterr().out)
    assert load(str(tmp_path / "cpu"), artifacts.CONFIG)["run"]["device"] == "cpu"
    assert artifacts.dumps(pairs) == read_bytes(out_dir(base), artifacts.IG_PAIRS).decode()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal when CUDA is absent")
def test_device_cuda_without_cuda_is_refused(base, tmp_path, capsys):
    args = with_flags(base, output_dir=tmp_path / "cuda", device="cuda")
    line = run_refused(args, capsys)
    assert "--device cuda" in line
    assert not os.path.exists(os.path.join(out_dir(args), artifacts.IG_PAIRS))


def test_stages_run_one_after_another(base, tmp_path):
    folder, ref = str(tmp_path / "staged"), out_dir(base)
    learner_files = (artifacts.LEARNER, artifacts.LEARNER_METRICS)
    run_ok(with_flags(base, output_dir=folder, stages="ig_pairs"))
    assert read_bytes(folder, artifacts.IG_PAIRS) == read_bytes(ref, artifacts.IG_PAIRS)
    assert not any(os.path.exists(os.path.join(folder, n)) for n in learner_files + (artifacts.RESULTS,))
    assert not os.listdir(os.path.join(folder, artifacts.RUNS))

    run_ok(with_flags(base, output_dir=folder, stages="learner"))  # from the saved pairs
    assert read_bytes(folder, artifacts.LEARNER_METRICS) == read_bytes(ref, artifacts.LEARNER_METRICS)
    assert same_state(load_learner(folder)["state"], load_learner(ref)["state"])
    assert not os.listdir(os.path.join(folder, artifacts.RUNS))
    assert not os.path.exists(os.path.join(folder, artifacts.RESULTS))

    run_ok(with_flags(base, output_dir=folder, stages=["finetune", "plot"]))
    names = sorted(os.listdir(os.path.join(ref, artifacts.RUNS)))
    assert sorted(os.listdir(os.path.join(folder, artifacts.RUNS))) == names and len(names) == 6
    for name in [os.path.join(artifacts.RUNS, n) for n in names] + [artifacts.RESULTS]:
        assert read_bytes(folder, name) == read_bytes(ref, name), name
    assert os.path.exists(os.path.join(folder, artifacts.FIGURE))


def test_preset_study_runs_at_the_papers_label_budget_on_five_independent_pipelines(tmp_path):
    study = parse_args(["--preset", "study", "--output_dir", str(tmp_path / "o")])
    assert study.finetune.methods == ["standard", "igf_constant", "dsir", "dsir_validation", "oracle", "oracle_online",
                                      "igf_refresh", "color", "color_validation", "rho"]
    assert study.data.size_final_test_set == 1024  # the verdict's larger test sample
    assert (study.run.num_pipelines, study.run.pipeline_streams, study.finetune.num_runs) == (5, "own", 3)
    assert (study.data.size_objective_set, study.ig.num_ig_pairs, study.ig.num_heldout_pairs) == (100, 4000, 500)
    assert study.learner.learner_ensemble == 5 and not study.run.allow_weak_learner  # behind the gate
    assert (study.finetune.max_steps, study.finetune.eval_every, study.ig.num_validation_pairs) == (24, 6, 40)
    # the first study stays reachable, as it ran: shared streams, one ungated learner, no held-out labels
    first = parse_args(["--preset", "study_v1", "--output_dir", str(tmp_path / "o")])
    assert first.finetune.methods == ["standard", "igf_constant", "random", "dsir", "source_matched"]
    assert (first.run.num_pipelines, first.run.pipeline_streams, first.finetune.num_runs) == (3, "shared", 6)
    assert (first.learner.learner_ensemble, first.ig.num_heldout_pairs, first.run.allow_weak_learner) == (1, 0, True)
    assert first.data.size_objective_set == 32 and first.ig.num_validation_pairs == 100


def test_preset_rho_is_rho_loss_beside_standard_without_labels_in_its_own_folder(tmp_path, monkeypatch):
    from igf.selection import needs_labels, needs_learner

    monkeypatch.chdir(tmp_path)
    rho = parse_args(["--preset", "rho"])
    assert rho.finetune.methods == ["standard", "rho"] and rho.finetune.keep_fraction == 0.5
    assert not needs_labels(rho.finetune) and not needs_learner(rho.finetune)  # no IG labels, no learner
    assert rho.run.output_dir == "output_rho"  # never the quick start's output/
    # the rest is the quick start's scale, and any flag still overrides the preset
    assert (rho.finetune.max_steps, rho.finetune.num_runs, rho.data.size_objective_set) == (8, 3, 32)
    mine = parse_args(["--preset", "rho", "--methods", "rho", "--num_runs", "1", "--output_dir", "mine"])
    assert (mine.finetune.methods, mine.finetune.num_runs, mine.run.output_dir) == (["rho"], 1, "mine")
    assert not os.path.exists(tmp_path / "output_rho")  # parsing alone writes nothing


def test_preset_paper_and_explicit_flags_override_it(tmp_path):
    out = ["--output_dir", str(tmp_path / "out")]
    paper = parse_args(["--preset", "paper", *out])
    assert (paper.finetune.batch_size, paper.finetune.max_steps, paper.finetune.num_runs,
            paper.data.size_objective_set) == (16, 60, 50, 100)
    flat = {k: v for section in paper.to_dict().values() for k, v in section.items()}
    assert {k: flat[k] for k in PRESETS["paper"]} == PRESETS["paper"]
    default = parse_args(out)  # the dataclass defaults, whatever they are
    assert (default.finetune, default.data.size_objective_set) == (FinetuneConfig(), DataConfig().size_objective_set)
    override = parse_args(["--preset", "paper", "--num_runs", "3", *out])
    assert override.finetune.num_runs == 3 and override.finetune.max_steps == 60  # the rest stays the preset's
    assert parse_args(["--num_runs", "3", "--preset", "paper", *out]).finetune.num_runs == 3  # in any order
    assert not os.path.exists(tmp_path / "out")  # parsing alone writes nothing


def test_methods_order_is_irrelevant(base, tmp_path):
    folder = rerun(base, tmp_path / "order", stages=["finetune", "plot"],
                   methods=["igf_shifting", "standard", "igf_constant"])
    ref = out_dir(base)
    names = sorted(os.listdir(os.path.join(ref, artifacts.RUNS)))
    assert sorted(os.listdir(os.path.join(folder, artifacts.RUNS))) == names
    for name in [os.path.join(artifacts.RUNS, n) for n in names] + [artifacts.RESULTS]:
        assert read_bytes(folder, name) == read_bytes(ref, name), name
