"""benchmarks/ig_speed.py end to end on the tiny model: every row is printed and every figure is a sane number.
No timing thresholds: speed depends on the machine, and the benchmark itself reports against its targets."""
import contextlib
import io
import json
import math
import os
import platform
import sys

import pytest
from scipy import stats

from conftest import ROOT
from igf import artifacts

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import ig_speed  # noqa: E402

PER_OPTIMIZER = ["exact_s_per_pair", "floor_forward_s", "floor_step_s", "floor_s", "exact_over_floor", "exact_user_s",
                 "exact_sys_s", "exact_sys_share", "exact_minor_faults", "exact_labels_per_s",
                 "first_order_labels_per_s", "first_order_setup_s", "first_order_pearson", "first_order_spearman",
                 "mallopt.exact_s_per_pair", "mallopt.exact_sys_s", "mallopt.exact_minor_faults",
                 "mallopt_over_default", "mallopt_over_default_sys"]
ONCE = ["standard_s_per_step", "igf_s_per_step", "igf_acceptance", "igf_over_standard", "peak_rss_mib"]
# wall-clock figures: finite and > 0 (CPU seconds and page faults can be 0 for the tiny model: only >= 0)
POSITIVE = ["exact_s_per_pair", "floor_forward_s", "floor_step_s", "floor_s", "exact_over_floor", "exact_labels_per_s",
            "first_order_labels_per_s", "first_order_setup_s", "mallopt.exact_s_per_pair", "mallopt_over_default"]
NON_NEGATIVE = ["exact_user_s", "exact_sys_s", "exact_minor_faults", "mallopt.exact_sys_s",
                "mallopt.exact_minor_faults"]
GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


@pytest.fixture(scope="module")
def benchmark_run(tiny_model, text_files, tmp_path_factory):
    """(rows returned, what was printed, the JSON written) of one run with tiny sizes."""
    out = tmp_path_factory.mktemp("bench") / "speed.json"
    argv = ["--model_name_or_path", tiny_model, "--train_file", text_files["train"],
            "--validation_file", text_files["validation"], "--test_file", text_files["test"],
            "--context_len", "16", "--size_objective_set", "8", "--ig_eval_batch_size", "4", "--num_exact", "6",
            "--num_first_order", "12", "--batch_size", "4", "--steps", "2", "--threads", "1", "--device", "cpu",
            "--json", str(out)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = ig_speed.main(argv)
    with open(out) as fh:
        return rows, printed.getvalue(), json.load(fh)


def test_table_has_every_row(benchmark_run):
    rows, printed, saved = benchmark_run
    table = ig_speed.render(rows)
    assert table in printed and saved["header"] in printed
    keys = [r[0] for r in rows]
    expected = [f"{opt}.{k}" for opt in ("sgd", "adam") for k in PER_OPTIMIZER] + ONCE
    assert sorted(keys) == sorted(expected)
    assert len(table.splitlines()) == 2 + len(expected)
    for opt in ("sgd", "adam"):
        assert f"exact IG ({opt}), glibc default |" in table
        assert f"exact IG ({opt}), mallopt: no mmap/trim |" in table
        assert f"exact IG ({opt}) / floor |" in table
    assert "| IGF / standard | ratio |" in table
    assert saved["rows"] == [dict(zip(("key", "metric", "unit", "value", "target"), r)) for r in rows]
    assert "parameters" in saved["header"] and "threads 1" in saved["header"]


def test_figures_are_sane(benchmark_run):
    """Every figure is a finite number of the right sign, and each derived figure is what its parts give,
    recomputed here (a mislabelled or misassigned row fails)."""
    figures = benchmark_run[2]["figures"]
    for opt in ("sgd", "adam"):
        f = {key: figures[f"{opt}.{key}"] for key in PER_OPTIMIZER}
        for key in POSITIVE + NON_NEGATIVE:
            value = f[key]
            if key.startswith("mallopt") and not GLIBC:
                assert value is None, (opt, key)  # skipped, and printed as n/a
            else:
                assert math.isfinite(value) and (value > 0 if key in POSITIVE else value >= 0), (opt, key, value)
        assert f["floor_s"] == pytest.approx(f["floor_forward_s"] + f["floor_step_s"], rel=1e-12)
        assert f["exact_over_floor"] == pytest.approx(f["exact_s_per_pair"] / f["floor_s"], rel=1e-12)
        assert f["exact_labels_per_s"] == pytest.approx(1 / f["exact_s_per_pair"], rel=1e-12)
        share = f["exact_sys_share"]
        assert share == (pytest.approx(f["exact_sys_s"] / f["exact_user_s"], rel=1e-12) if f["exact_user_s"] > 0
                         else None)
        if GLIBC:
            assert f["mallopt_over_default"] == pytest.approx(f["mallopt.exact_s_per_pair"] / f["exact_s_per_pair"],
                                                              rel=1e-12)
        # first-order IG tracks exact IG on the same contexts (the estimator's reason to exist)
        assert f["first_order_pearson"] > 0.9 and f["first_order_spearman"] > 0.9, (opt, f)
    for key in ONCE:
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    assert figures["igf_over_standard"] == pytest.approx(figures["igf_s_per_step"] / figures["standard_s_per_step"],
                                                         rel=1e-12)
    # the threshold keeps the top 30 % of a sample's scores: the kept share is near it, not anything in (0, 1]
    assert 0.05 <= figures["igf_acceptance"] <= 0.7


def test_flags_checked():
    with pytest.raises(SystemExit):
        ig_speed.parse_args(["--num_exact", "9", "--num_first_order", "8"])
    with pytest.raises(SystemExit):
        ig_speed.parse_args(["--train_file", "a.txt"])
    args = ig_speed.parse_args(["--ig_optimizer", "sgd"])
    assert args.model_name_or_path == "embedded-smollm2" and args.context_len == 32 and args.threads == 2


def test_filter_speed_benchmark_on_the_tiny_model(tiny_model, text_folders, tmp_path):
    """benchmarks/filter_speed.py with a tiny learner and corpus: one row per size and repeat, the tokenizer-alone
    ceiling beside each, sane figures, the table."""
    import run_clm_igf
    from conftest import tiny_flags

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import filter_speed

    out = tmp_path / "out"
    assert run_clm_igf.main(tiny_flags(tiny_model, text_folders, out) + ["--stages", "ig_pairs", "learner"]) == 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = filter_speed.main(["--output_dir", str(out), "--input", text_folders["train"], "--sizes_mb", "0.02",
                                  "0.05", "--repeats", "1", "--work_dir", str(tmp_path), "--json",
                                  str(tmp_path / "f.json")])
    assert [r["megabytes"] >= mb for r, mb in zip(rows, (0.02, 0.05))] == [True, True]  # whole files, repeated
    for r in rows:
        assert r["contexts"] > 0 and r["tokens"] == 16 * r["contexts"] and 0 < r["kept"] <= r["contexts"]
        assert r["tokens_per_second"] == pytest.approx(r["tokens"] / r["seconds"])
        assert r["ratio"] == pytest.approx(r["tokens_per_second"] / r["tokenizer_tokens_per_second"])
        assert r["peak_rss_bytes"] > 10e6 and r["start_up_seconds"] > r["load_seconds"] > 0
    assert rows[1]["contexts"] > rows[0]["contexts"]
    assert "| tokenizer alone, tokens/s | filter, tokens/s | filter / tokenizer |" in printed.getvalue()
    assert json.load(open(tmp_path / "f.json")) == rows


def test_filter_speed_benchmark_builds_learners_of_each_ensemble_size(tiny_model, text_folders, tmp_path):
    """Without --output_dir: random learner folders of --ensembles members on the LM, each measured --repeats
    times against the tokenizer alone, their z scale set so that --threshold 0 keeps some contexts, not all."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import filter_speed

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = filter_speed.main(["--model_name_or_path", tiny_model, "--ensembles", "1", "2", "--input",
                                  text_folders["train"], "--sizes_mb", "0.03", "--repeats", "2", "--work_dir",
                                  str(tmp_path)])
    assert [(r["describe"], r["repeat"]) for r in rows] == [("one learner", 0), ("ensemble of 2", 0),
                                                             ("one learner", 1), ("ensemble of 2", 1)]
    for r in rows:
        assert r["tokens"] == 32 * r["contexts"] and 0 < r["kept"] < r["contexts"] and r["learner_folder"]
        assert r["ratio"] == pytest.approx(r["tokens_per_second"] / r["tokenizer_tokens_per_second"])
    assert len({r["tokenizer_tokens_per_second"] for r in rows}) == 4  # the ceiling timed again before each run
    table = printed.getvalue()
    assert "| one learner, folder of " in table and "| ensemble of 2, folder of " in table


def test_learner_ladder_on_the_tiny_model(tiny_model, text_folders, tmp_path):
    """benchmarks/learner_ladder.py on a two-pipeline tiny study: every rung's learners, scored on the held-out
    labels, the table, and a second invocation that resumes from the JSON without training."""
    import run_clm_igf
    from conftest import tiny_flags

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import learner_ladder

    out = tmp_path / "study"
    flags = tiny_flags(tiny_model, text_folders, out) + ["--stages", "ig_pairs", "learner", "--num_pipelines", "2"]
    assert run_clm_igf.main(flags) == 0
    argv = ["--study", str(out), "--budgets", "12", "24", "--seeds", "2", "--ensemble", "2", "--learning_rates",
            "1e-2", "1e-3", "--epochs", "3", "--patience", "1", "--output", str(tmp_path / "ladder.json")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        records = learner_ladder.main(argv)
    # per pipeline: budgets 12 and 24 x (2 single seeds + 2 ensembles), and lr 1e-3 at 24 (the same)
    assert len(records) == 2 * 3 * (2 + 2)
    assert {(r["budget"], r["ensemble"]) for r in records if r["lr"] == 1e-3} == {(24, 1), (24, 2)}
    # recomputed from the study's files: the context's own loss against held-out IG (scipy), the kept share of
    # each source sums to one, the group's share is its sources' shares
    for r in records:
        heldout = json.load(open(os.path.join(artifacts.pipeline_dir(str(out), r["pipeline"]),
                                              artifacts.IG_PAIRS)))["heldout"]
        rho = stats.spearmanr([math.log(h["context_ppl"]) for h in heldout], [h["ig"] for h in heldout]).statistic
        assert r["loss_spearman"] == pytest.approx(rho, rel=1e-9)
        assert sum(r["shares"].values()) == pytest.approx(1.0) and len(r["shares"]) == 2
        assert r["group_share"] == pytest.approx(sum(v for k, v in r["shares"].items() if k.startswith("kjv/")))
        assert 1 <= min(r["best_epochs"]) <= 3 and len(r["best_epochs"]) == r["ensemble"]
        assert (r["epochs"], r["patience"]) == (3, 1) and r["labels"]
    table = printed.getvalue()
    assert "| objective set | labels | learner |" in table and "| 100 | 24 | ensemble of 2 | 0.01 |" in table
    again = io.StringIO()
    with contextlib.redirect_stdout(again):
        assert learner_ladder.main(argv) == records  # resumed: nothing trained again
    assert " #0: held-out" not in again.getvalue() and "| 100 | 12 | single | 0.01 |" in again.getvalue()
    # --seeds 0: ensembles alone (3 rungs x 2 draws of 3 per pipeline), added to the same file
    bigger = io.StringIO()
    with contextlib.redirect_stdout(bigger):
        more = learner_ladder.main(argv[:5] + ["--seeds", "0", "--ensemble", "3"] + argv[9:])
    assert more[:len(records)] == records and len(more) == len(records) + 2 * 3 * 2
    assert {r["ensemble"] for r in more[len(records):]} == {3}
    assert "| 100 | 24 | ensemble of 3 | 0.001 |" in bigger.getvalue()
    # a record is reused only for the settings and labels it was made with: another --epochs trains anew
    other = io.StringIO()
    with contextlib.redirect_stdout(other):
        longer = learner_ladder.main(argv[:-6] + ["--epochs", "4", "--patience", "1"] + argv[-2:])
    assert len(longer) == len(more) + len(records) and {r["epochs"] for r in longer[len(more):]} == {4}
    assert " #0: held-out" in other.getvalue()


def test_refresh_every_benchmark_reproduces_the_drivers_oracle_online(tiny_model, text_folders, tmp_path, monkeypatch,
                                                                     capsys):
    """benchmarks/refresh_every.py on a tiny study: at the driver's --online_refresh_every (its default, 4) every run
    is the driver's own oracle_online run (same scores, kept rows and perplexities, bit for bit), each run pairs with
    the study's saved standard run, each k's selection cost is its objective gradients plus its windows, and a rerun
    loads every finished (k, run) instead of training it again."""
    import run_clm_igf
    from conftest import set_flag, tiny_flags

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import refresh_every

    study, bench = tmp_path / "study", tmp_path / "bench"
    flags = set_flag(tiny_flags(tiny_model, text_folders, study), "--ig_optimizer", "sgd")  # oracle_online's IG
    flags = set_flag(set_flag(flags, "--methods", "standard", "oracle_online"), "--max_steps", "5")
    flags = set_flag(flags, "--size_final_test_set", "32")
    assert run_clm_igf.main(flags) == 0
    i = flags.index("--output_dir")
    driver = flags[:i] + flags[i + 2:]  # the study's flags but its folder, which --study names
    argv = ["--study", str(study), "--preset", "default", "--refresh_every", "1", "4", "--runs", "2",
            "--output_dir", str(bench), "--json", str(tmp_path / "rows.json"), *driver]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = refresh_every.main(argv)
    assert [(r["k"], r["runs"], r["gradients_per_run"]) for r in rows] == [(1, 2, 5), (4, 2, 2)]
    entries = {(k, r): json.load(open(refresh_every.entry_path(str(bench), 0, k, r))) for k in (1, 4) for r in (0, 1)}
    study_runs = {(m, r): json.load(open(artifacts.run_path(str(study), m, 0, r)))
                  for m in ("standard", "oracle_online") for r in (0, 1)}
    for r in (0, 1):
        mine, theirs = entries[4, r]["record"], study_runs["oracle_online", r]
        for key in ("test_ppl", "final_test_ppl_large", "kept_rows", "scores", "train_loss", "cost", "seed"):
            assert mine[key] == theirs[key], key
        assert entries[4, r]["fingerprint"] == theirs["fingerprint"]  # the same run, as the driver names it
        # k = 1 recomputes the gradient after step 1: the first batch is scored alike, the second not
        other = entries[1, r]["record"]
        assert other["scores"][0] == mine["scores"][0] and other["scores"][1] != mine["scores"][1]
        for k, e in ((k, entries[k, r]["record"]) for k in (1, 4)):
            gradients = refresh_every.gradients_per_run(5, k)
            assert sum(e["cost"]["selection"]) == 2.0 * sum(e["candidates_drawn"]) + gradients * 3.0 * 8
    by_k = {r["k"]: r for r in rows}
    assert by_k[4]["vs_study_online"] == 0.0 and by_k[4]["vs_study_online_large"] == 0.0
    assert by_k[4]["pairs_study_online"] == 2 and "vs_study_online" not in by_k[1]
    for k in (1, 4):
        ppl = [entries[k, r]["record"]["test_ppl"][-1] for r in (0, 1)]
        large = [entries[k, r]["record"]["final_test_ppl_large"] for r in (0, 1)]
        std = [study_runs["standard", r]["test_ppl"][-1] for r in (0, 1)]
        std_large = [study_runs["standard", r]["final_test_ppl_large"] for r in (0, 1)]
        assert by_k[k]["test_ppl"] == pytest.approx(sum(ppl) / 2, rel=1e-12)
        assert by_k[k]["vs_standard"] == pytest.approx((ppl[0] - std[0] + ppl[1] - std[1]) / 2, rel=1e-9)
        assert by_k[k]["vs_standard_large"] == pytest.approx((large[0] - std_large[0] + large[1] - std_large[1]) / 2,
                                                             rel=1e-9)
        assert by_k[k]["pairs_standard"] == 2 and by_k[k]["seconds_per_run"] > 0
    assert by_k[1]["selection_fe_per_run"] > by_k[4]["selection_fe_per_run"]
    assert "| 4 | 2 | 2 |" in printed.getvalue() and json.load(open(tmp_path / "rows.json"))["rows"] == rows
    # resumed: every (k, run) is loaded, none trained again
    monkeypatch.setattr(refresh_every, "finetune_run", lambda *a, **kw: pytest.fail("a finished run was trained"))
    again = io.StringIO()
    with contextlib.redirect_stdout(again):
        assert refresh_every.main(argv) == rows
    assert again.getvalue().count(": saved in ") == 4
    # the study folder is only read: an output inside it is refused before any work
    assert argv[9] == "--output_dir"
    with pytest.raises(SystemExit):
        refresh_every.main(argv[:9] + ["--output_dir", str(study / "x")] + argv[11:])
    assert "which this benchmark only reads" in capsys.readouterr().err and not os.path.exists(study / "x")
