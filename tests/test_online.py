"""The rules that select with the model as it is (oracle_online, igf_refresh, rho) and CoLoR-Filter's color, each
checked against an independent computation on a tiny random GPT-2: exact IG of a real SGD step at the weights the
run had when it picked the batch, and per-context losses from transformers' own loss."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
from scipy import stats
from transformers import AutoModelForCausalLM

from igf.finetune import conditional_model, finetune_run
from igf.secondary_learner import build_learner, predict
from igf.selection import (
    ModelContext,
    SelectionInputs,
    attach_model,
    candidate_stream,
    make_rule,
    make_selection,
    standardize_scores,
)

CPU = torch.device("cpu")
IG_LR = 1e-3  # the IG step: small enough that first order tracks the real step
STEPS, BATCH = 3, 4
CFG = SimpleNamespace(batch_size=BATCH, max_steps=STEPS, learning_rate=3e-3, weight_decay=0.0, warmup_steps=0,
                      eval_every=STEPS, eval_batch_size=8)
LEARNER = SimpleNamespace(learner_val_fraction=0.25, learner_learning_rate=1e-2, learner_batch_size=8,
                          learner_weight_decay=0.0)


@pytest.fixture
def tiny(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    pool = torch.randint(2, vocab, (120, 12), generator=g)
    objective = torch.randint(2, vocab // 2, (6, 12), generator=g)  # another token mix than the pool's average
    test = torch.randint(2, vocab, (8, 12), generator=g)
    return model, pool, objective, test


def inputs_for(model, pool, objective, acceptance=0.5, refresh_every=1, refresh_labels=24):
    inputs = SelectionInputs(acceptance=[acceptance] * STEPS)
    inputs.lm = ModelContext(model, pool, objective, CPU, 8, BATCH, IG_LR, refresh_every, refresh_labels, 3, LEARNER)
    return inputs


def hf_loss(model, x):
    """Mean next-token NLL of one context by transformers' own loss (labels = inputs)."""
    with torch.no_grad():
        return model(input_ids=x.unsqueeze(0), labels=x.unsqueeze(0)).loss.double().item()


def objective_ppl(model, objective):
    with torch.no_grad():
        return math.exp(model(input_ids=objective, labels=objective).loss.double().item())


def exact_sgd_ig(model, objective, x, lr=IG_LR):
    """IG(x) by its definition: objective PPL before minus after one plain SGD step on x alone, on a copy."""
    m = copy.deepcopy(model)
    m.eval()
    before = objective_ppl(m, objective)
    m.zero_grad()
    m(input_ids=x.unsqueeze(0), labels=x.unsqueeze(0)).loss.backward()
    with torch.no_grad():
        for p in m.parameters():
            p -= lr * p.grad
    return before - objective_ppl(m, objective)


class Spy:
    """A selection that remembers the model's weights when each batch was picked."""

    def __init__(self, selection, model):
        self.selection, self.model, self.weights = selection, model, []

    @property
    def plan(self):
        return self.selection.plan

    def next(self, b):
        self.weights.append(copy.deepcopy(self.model.state_dict()))
        return self.selection.next(b)


def run_online(method, model, pool, objective, test, inputs, seed=5):
    rule = make_rule(method, inputs, seed)
    stream = candidate_stream(len(pool), torch.Generator().manual_seed(seed))
    spy = Spy(make_selection(rule, stream, BATCH, STEPS), model)
    record = finetune_run(model, pool, test, spy, method=method, run=0, seed=seed, ppl_start=1.0, cfg=CFG,
                          device=CPU)
    return record, spy


def test_oracle_online_keeps_the_top_of_each_window_by_exact_ig_at_the_current_weights(tiny):
    model, pool, objective, test = tiny
    start = copy.deepcopy(model.state_dict())
    record, spy = run_online("oracle_online", model, pool, objective, test, inputs_for(model, pool, objective))
    at_start = copy.deepcopy(model)
    at_start.load_state_dict(start)
    moved = []
    for b in range(STEPS):
        at_b = copy.deepcopy(model)
        at_b.load_state_dict(spy.weights[b])
        rows = [r for r, _ in record["scores"][b]]
        assert len(rows) == math.ceil(BATCH / 0.5) == record["candidates_drawn"][b]  # IGF's draw at a_b = 1/2
        exact = [exact_sgd_ig(at_b, objective, pool[r]) for r in rows]
        recorded = [v for _, v in record["scores"][b]]
        assert stats.spearmanr(recorded, exact).statistic > 0.95
        # the kept rows are the top batch_size of the window by exact IG (up to near-ties)
        ranked = sorted(exact, reverse=True)
        margin = 0.02 * (ranked[0] - ranked[-1])
        kept_exact = [e for r, e in zip(rows, exact) if r in record["kept_rows"][b]]
        assert len(kept_exact) == BATCH and min(kept_exact) >= ranked[BATCH] - margin
        moved.append(stats.spearmanr(exact, [exact_sgd_ig(at_start, objective, pool[r]) for r in rows]).statistic)
    assert moved[0] == pytest.approx(1.0)
    assert min(moved[1:]) < 0.999  # after a step IG at theta_t is not IG at theta_0: the rule saw the model move
    assert record["cost"]["selection"] == [3 * len(objective) + 2 * 8] * STEPS


def test_rho_scores_the_current_loss_minus_the_conditional_models(tiny):
    model, pool, objective, test = tiny
    inputs = inputs_for(model, pool, objective)
    conditional, _ = conditional_model(model, objective, 4, 1e-2, 3, 0, CPU)
    inputs.conditional["objective"], inputs.setup["rho"] = (conditional, {}), {"forward_equivalents": 0.0,
                                                                              "seconds": 0.0}
    record, spy = run_online("rho", model, pool, objective, test, inputs)
    for b in (0, STEPS - 1):
        at_b = copy.deepcopy(model)
        at_b.load_state_dict(spy.weights[b])
        for row, value in record["scores"][b][:3]:
            assert value == pytest.approx(hf_loss(at_b, pool[row]) - hf_loss(conditional, pool[row]), abs=1e-5)


def test_color_scores_the_prior_loss_minus_the_loss_after_fine_tuning_on_the_objective(tiny):
    model, pool, objective, _ = tiny
    before = copy.deepcopy(model.state_dict())
    inputs = inputs_for(model, pool, objective)
    pairs = {"pairs": [{"context_index": r} for r in range(40)], "ppl_before": objective_ppl(model, objective)}
    ft = SimpleNamespace(batch_size=3, color_steps=6, color_learning_rate=1e-2, online_refresh_every=1,
                         refresh_labels=8, refresh_epochs=1)
    ig_cfg = SimpleNamespace(ig_learning_rate=IG_LR, ig_optimizer="sgd")
    attach_model(inputs, {"color"}, {}, model, pool, pairs, ig_cfg=ig_cfg, ft=ft, learner_cfg=LEARNER,
                 objective=objective, validation=None, batch_size=8, device=CPU, seed=0)
    conditional, cost = inputs.conditional["objective"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the prior model is untouched
    assert objective_ppl(conditional, objective) < 0.9 * objective_ppl(model, objective)  # it learned the target
    assert cost["forward_equivalents"] == 6 * 3 * 3
    scores = inputs.scorers["color"]([5, 17, 99])
    for row, value in zip([5, 17, 99], scores.tolist()):
        assert value == pytest.approx(hf_loss(model, pool[row]) - hf_loss(conditional, pool[row]), abs=1e-5)
    assert inputs.setup["color"]["forward_equivalents"] == 6 * 3 * 3 + 2 * 40  # tuning + the reference sample


def refresh_inputs(model, pool, objective):
    torch.manual_seed(0)
    learner = build_learner(model.get_input_embeddings().weight, None, 2, channels=8, kernel_size=3, hidden=4,
                            dropout=0.0, pooling="max")
    inputs = inputs_for(model, pool, objective, refresh_every=2)
    inputs.learner, inputs.scale_rows = learner, torch.arange(len(pool))
    inputs.pool_scores = standardize_scores(predict(learner, pool))
    inputs.thresholds["igf_constant"] = lambda b: 0.0
    inputs.setup["learner"] = {"forward_equivalents": 0.0, "seconds": None}
    return inputs


def test_igf_refresh_labels_at_the_current_weights_and_reproduces_itself(tiny):
    model, pool, objective, test = tiny
    start = copy.deepcopy(model.state_dict())
    inputs = refresh_inputs(model, pool, objective)
    learner_before = copy.deepcopy(inputs.learner.state_dict())
    record, spy = run_online("igf_refresh", model, pool, objective, test, inputs)
    (refresh,) = record["refreshes"]  # every 2 steps, from step 2 on: one refresh in 3 steps
    assert refresh["batch"] == 2 and len(refresh["labelled_rows"]) == 24
    at_2 = copy.deepcopy(model)
    at_2.load_state_dict(spy.weights[2])
    exact = [exact_sgd_ig(at_2, objective, pool[r]) for r in refresh["labelled_rows"]]
    assert stats.spearmanr(refresh["labels"], exact).statistic > 0.95  # labelled at theta_2
    at_0 = copy.deepcopy(model)
    at_0.load_state_dict(start)
    assert stats.spearmanr(refresh["labels"], [exact_sgd_ig(at_0, objective, pool[r])
                                               for r in refresh["labelled_rows"]]).statistic < 0.999
    # batches 0-1 are igf_constant's (same learner, stream and threshold); the pipeline's learner is untouched
    kept_static = [r for r, v in record["scores"][0] if inputs.pool_scores[r] >= 0.0]
    assert record["kept_rows"][0] == kept_static[:BATCH]
    assert all(torch.equal(learner_before[k], v) for k, v in inputs.learner.state_dict().items())
    # the same run again, from the same weights: the same labels, learner and batches
    model.load_state_dict(start)
    again, _ = run_online("igf_refresh", model, pool, objective, test, refresh_inputs(model, pool, objective))
    assert again["kept_rows"] == record["kept_rows"] and again["scores"] == record["scores"]
    assert again["refreshes"][0]["labels"] == refresh["labels"]
    # another model: other labels
    model.load_state_dict(start)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.5)
    other, _ = run_online("igf_refresh", model, pool, objective, test, refresh_inputs(model, pool, objective))
    assert other["refreshes"][0]["labels"] != refresh["labels"]


# ----------------------------------------------------------------------------- through the driver

def test_online_runs_pair_with_standard_resume_and_measure_the_larger_test_sample(tiny_args, tmp_path):
    import json
    import os

    import run_clm_igf
    from conftest import set_flag
    from igf import artifacts
    from igf.data import build_context_sets, load_raw_splits, tokenize_splits

    args = set_flag(tiny_args, "--ig_optimizer", "sgd")
    args = set_flag(args, "--methods", "standard", "igf_constant", "oracle_online", "igf_refresh", "rho")
    args += ["--online_refresh_every", "2", "--refresh_labels", "12", "--refresh_epochs", "2", "--color_steps", "2",
             "--size_final_test_set", "40", "--save_models"]
    assert run_clm_igf.main(args) == 0
    out = args[args.index("--output_dir") + 1]

    def run(method, r=0):
        return json.load(open(os.path.join(out, artifacts.RUNS, f"{method}_run{r:03d}.json")))
    standard = run("standard")
    for method in ("oracle_online", "igf_refresh", "rho"):
        rec = run(method)
        assert rec["seed"] == standard["seed"]
        drawn = [r for r, _ in rec["scores"][0]]  # batch 0 draws the head of the same seeded stream
        assert drawn[:4] == standard["kept_rows"][0]
        # the larger sample: its first --size_test_set rows are the test set; its PPL is the model's on 40 contexts
        assert rec["size_final_test_set"] == 40 and rec["final_test_ppl_large"] > 1
    # rerun one online run from nothing (its file removed): the same batches, scores and perplexities
    path = os.path.join(out, artifacts.RUNS, "igf_refresh_run001.json")
    first = json.load(open(path))
    os.remove(path)
    assert run_clm_igf.main(args) == 0
    again = json.load(open(path))
    for key in ("kept_rows", "scores", "test_ppl", "final_test_ppl_large", "candidates_drawn"):
        assert again[key] == first[key], key
    assert [r["labels"] for r in again["refreshes"]] == [r["labels"] for r in first["refreshes"]]
    # the larger test sample, drawn again by hand: the same permutation as the test set's
    cfg = run_clm_igf.parse_args(args)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.model_name_or_path)
    raw = load_raw_splits(train_file=[(cfg.data.train_file, "train")],
                          validation_file=[(cfg.data.validation_file, "v")], test_file=[(cfg.data.test_file, "t")])
    sets = build_context_sets(tokenize_splits(raw, tokenizer), 16, 16, cfg.run.seed + 1, size_final_test_set=40)
    assert torch.equal(sets.final_test[:16], sets.test)
    for method in ("standard", "igf_refresh"):  # the saved fine-tuned model (run 0), evaluated by transformers
        model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "models", method), dtype=torch.float32)
        with torch.no_grad():
            ppl = math.exp(model(input_ids=sets.final_test, labels=sets.final_test).loss.double().item())
        assert run(method)["final_test_ppl_large"] == pytest.approx(ppl, rel=1e-5)
    results = json.load(open(os.path.join(out, artifacts.RESULTS)))
    assert results["methods"]["standard"]["size_final_test_set"] == 40
    assert "final_large" in results["tests"]["rho_vs_standard"]


def test_keep_fraction_runs_rho_color_and_dsir_without_labels_and_reuses_them_beside_igf(tiny_args, tmp_path):
    import json
    import os

    import numpy as np

    import run_clm_igf
    from conftest import set_flag
    from igf import artifacts
    from igf.dsir import dsir_scores
    from igf.pipelines import make_pipelines
    from igf.selection import candidate_stream

    args = set_flag(tiny_args, "--methods", "standard", "rho", "color", "dsir")
    args += ["--keep_fraction", "0.5", "--color_steps", "2", "--save_models"]
    assert run_clm_igf.main(args) == 0
    out = args[args.index("--output_dir") + 1]
    # no labels, no learner: the rules score without them
    assert not os.path.exists(os.path.join(out, artifacts.IG_PAIRS))
    assert not [n for n in os.listdir(out) if n.startswith("secondary_learner")]

    def run(method, r=0, folder=out):
        return json.load(open(os.path.join(folder, artifacts.RUNS, f"{method}_run{r:03d}.json")))
    for r in range(2):
        rho = run("rho", r)
        assert rho["candidates_drawn"] == [8, 8, 8]  # a window of ceil(4 / 0.5) at every batch
        for kept, scored in zip(rho["kept_rows"], rho["scores"]):  # the top half of each window, by its scores
            ranked = sorted(scored, key=lambda rv: -rv[1])
            assert sorted(kept) == sorted(row for row, _ in ranked[:4])
    # dsir keeps the top half of the whole pool by its weights: redrawn here from the run's own stream, it keeps
    # exactly the drawn candidates at or above the pool's median weight
    cfg = run_clm_igf.parse_args(args)
    _, _, sets, _, _ = run_clm_igf.load_model_and_contexts(cfg, torch.device("cpu"))
    pipe = make_pipelines(cfg, sets)[0]
    weights = dsir_scores(sets.train.numpy(), pipe.objective.numpy(), cfg.finetune.dsir_buckets)
    cut = np.sort(weights)[::-1][int(np.ceil(0.5 * len(weights))) - 1]
    for r in range(2):
        dsir = run("dsir", r)
        stream = candidate_stream(len(sets.train), torch.Generator().manual_seed(dsir["seed"]))
        drawn = [next(stream) for _ in range(sum(dsir["candidates_drawn"]))]
        assert [row for row in drawn if weights[row] >= cut] == [row for b in dsir["kept_rows"] for row in b]
    card = open(os.path.join(out, "models", "rho", "README.md")).read()
    assert "--keep_fraction" in card and "secondary learner:** not used" in card
    # oracle and ppl read the labels but need no learner; color keeps the same batches with labels made or not
    other = set_flag(set_flag(args, "--output_dir", str(tmp_path / "labelled")), "--methods", "standard", "color",
                     "oracle", "ppl")
    assert run_clm_igf.main(other) == 0
    labelled = str(tmp_path / "labelled")
    assert os.path.exists(os.path.join(labelled, artifacts.IG_PAIRS))
    assert not [n for n in os.listdir(labelled) if n.startswith("secondary_learner")]
    assert run("color", 1, labelled)["kept_rows"] == run("color", 1)["kept_rows"]
    for method in ("oracle", "ppl"):
        assert sum(run(method, 0, labelled)["candidates_drawn"]) > 12  # they rejected some candidates
    # beside IGF (labels and a learner now made) the learner-free runs are reused as they are
    before = {m: open(os.path.join(out, artifacts.RUNS, f"{m}_run000.json")).read() for m in ("rho", "color")}
    assert run_clm_igf.main(set_flag(args, "--methods", "standard", "igf_constant", "rho", "color", "dsir")) == 0
    assert [n for n in os.listdir(out) if n.startswith("secondary_learner")]
    for method, text in before.items():
        assert open(os.path.join(out, artifacts.RUNS, f"{method}_run000.json")).read() == text


def test_needs_learner_unless_keep_fraction_frees_the_rule():
    from igf.config import FinetuneConfig
    from igf.selection import needs_labels, needs_learner

    assert not needs_labels(FinetuneConfig(methods=["standard"]))
    assert needs_learner(FinetuneConfig(methods=["standard", "rho"]))  # IGF's acceptance: its learner
    free = FinetuneConfig(methods=["standard", "rho", "dsir", "color", "random", "oracle_online"], keep_fraction=0.5)
    assert not needs_learner(free) and not needs_labels(free)
    for method in ("ppl", "oracle"):  # their own reading of the labels, but no learner
        ft = FinetuneConfig(methods=["standard", method], keep_fraction=0.5)
        assert needs_labels(ft) and not needs_learner(ft)
    for method in ("igf_constant", "igf_refresh", "source_matched"):
        assert needs_learner(FinetuneConfig(methods=["standard", method], keep_fraction=0.5)), method


def test_costs_and_the_larger_sample_in_the_statistics_by_hand():
    from igf.statistics import compare_all, cost_table, run_cost

    def record(method, pipeline, run, final, large, sel_fe):
        return {"method": method, "pipeline": pipeline, "run": run, "batch_size": 2, "steps": [0, 1, 2],
                "test_ppl": [10.0, 9.0, final], "candidates_drawn": [2, 2], "final_test_ppl_large": large,
                "size_final_test_set": 7,
                "cost": {"setup": 50.0, "selection": sel_fe, "train": [6.0, 6.0]},
                "seconds": {"setup": 1.0, "selection": [0.5, 0.5], "train": [1.0, 2.0]}}
    rec = record("rho", 0, 0, 8.0, 8.5, [4.0, 0.0])
    cost = run_cost(rec)
    assert cost["fe"] == 16.0 and cost["fe_per_kept"] == 4.0 and cost["seconds"] == 4.0
    assert cost["fe_at_steps"] == [0.0, 10.0, 16.0] and cost["setup_fe"] == 50.0
    large = {0: [8.5, 8.0], 1: [8.1, 8.3], 2: [9.0, 8.2]}  # pipeline -> (standard, rho) on the larger sample
    records = {m: {p: [record(m, p, 0, 8.0, large[p][i], [0.0, 0.0])] for p in large}
               for i, m in enumerate(("standard", "rho"))}
    results = compare_all(records, [None] * 3)
    entry = results["across_pipelines"]["rho_vs_standard"]["final_large"]
    diffs = [large[p][1] - large[p][0] for p in large]
    assert entry["per_pipeline"] == pytest.approx(diffs)
    assert entry["t_test"]["p"] == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)
    assert entry["lower_in_pipelines"] == 2  # -0.5, +0.2, -0.8
    assert "| rho | 12 (0) | 3.00 | 4.0 | 1.000 |" in cost_table(results, records)


def test_the_drift_table_by_hand():
    import sys
    sys.path.insert(0, "benchmarks")
    from ig_drift import drift_table

    rows = drift_table([0, 4, 8], [[4, 3, 2, 1], [1, 2, 3, 4], [4, 3, 1, 2]], [10.0, 8.0, 7.5],
                       ["kjv", "kjv", "x", "x"])
    assert [r["spearman_vs_step0"] for r in rows] == pytest.approx([1.0, -1.0, 0.8])
    assert rows[2]["spearman_vs_previous"] == pytest.approx(-0.8)
    assert [r["top_half_overlap_with_step0"] for r in rows] == [1.0, 0.0, 1.0]
    assert [r["kjv_share_of_top_half"] for r in rows] == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("flags, named", [
    (["--methods", "standard", "oracle_online", "--ig_optimizer", "adam"], "--ig_optimizer adam"),
    (["--online_refresh_every", "0"], "--online_refresh_every"),
    (["--refresh_labels", "3"], "--refresh_labels"),
    (["--color_learning_rate", "nan"], "--color_learning_rate"),
    (["--size_final_test_set", "-1"], "--size_final_test_set"),
    (["--keep_fraction", "0"], "--keep_fraction"),
    (["--keep_fraction", "1.5"], "--keep_fraction"),
    (["--keep_fraction", "nan"], "--keep_fraction"),
    (["--keep_fraction", "0.005"], "--keep_fraction"),
    (["--keep_fraction", "0.5", "--methods", "standard", "source_matched"], "--keep_fraction"),
])
def test_the_online_flags_refuse_what_cannot_run_in_one_line(flags, named, tmp_path):
    from igf.config import parse_args
    from igf.errors import IGFError

    with pytest.raises(IGFError, match=named):
        parse_args(["--output_dir", str(tmp_path / "o")] + flags)
