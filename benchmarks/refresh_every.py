"""Where refreshing pays: oracle_online with its objective gradient recomputed every k steps, for several k.

oracle_online (igf/selection.py) keeps the top --batch_size of each window of candidates by first-order IG at the
current weights theta_t, and recomputes the objective gradient there every --online_refresh_every k steps (the
expensive part: 3 forward-equivalents per objective context). This benchmark fine-tunes one pipeline of a finished
study with oracle_online at several k (k = --max_steps computes the gradient once, at step 0), each run on the
candidate stream, seed, optimizer and schedule of the study's run of the same index, built by the driver's own
functions (run_clm_igf.load_model_and_contexts, the pipeline's saved IG pairs and trained learner, the rule's
acceptance, make_rule, finetune_run), so that run r pairs with the study's saved standard run r, read from its run
file and checked against its fingerprint. Per k it reports the final test perplexity on the test set and on the
final test set (--size_final_test_set, 1,024 contexts in the study; mean over runs), the mean paired difference
from standard and, at the study's own k, from the study's saved oracle_online runs (a consistency check: 0 when the
same thread count and CPU kind reproduce them bit for bit, float rounding otherwise), the LM forward-equivalents
spent on selection and the wall time, per run.

    python benchmarks/refresh_every.py --study output_study --preset study --pipeline 0 \\
        --refresh_every 1 2 4 8 24 --runs 3 --output_dir output_refresh_every --json refresh_every.json

Nothing is trained but the runs, and nothing is written into --study: each finished (k, run) goes to its own file
in --output_dir (e.g. pipeline0_k004_run000.json: the run record as the driver makes it, its wall times and its
fingerprint), written atomically, so an interrupted benchmark resumes where it stopped and a rerun only redraws
the table (after reloading the model, the data and the learner, which the fingerprint checks need). Any other flag
is the driver's, given as the study was run (e.g. --train_file ... for a study on your own text). Reproducing the
study's oracle_online runs bit for bit needs its CPU kind and thread count (one per process under accelerate
launch: OMP_NUM_THREADS=1); otherwise they agree to float rounding. Each run takes about as long as one of the
study's oracle_online runs, longer at small k (k = 1 computes 24 objective gradients per run, k = 4 six): run it
when the study is not running.
"""
import argparse
import math
import os
import sys
import time
from dataclasses import replace
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run_clm_igf  # noqa: E402  (the driver's own loading and fingerprints)
from igf import artifacts  # noqa: E402
from igf.artifacts import sha  # noqa: E402
from igf.config import parse_args as driver_config  # noqa: E402
from igf.config import run_seed, stage_seed  # noqa: E402
from igf.errors import IGFError  # noqa: E402
from igf.finetune import finetune_run  # noqa: E402
from igf.information_gain import WeightSnapshot, perplexity  # noqa: E402
from igf.paths import touches  # noqa: E402
from igf.pipelines import check_learners, load_ig_pairs, make_pipelines, run_learner  # noqa: E402
from igf.selection import (  # noqa: E402
    attach_model,
    candidate_stream,
    control_settings,
    make_rule,
    make_selection,
    selection_fingerprint,
    selection_inputs,
)

METHOD = "oracle_online"


def entry_path(output_dir, pipeline, k, run):
    return os.path.join(output_dir, f"pipeline{pipeline}_k{k:03d}_run{run:03d}.json")


def gradients_per_run(max_steps, k):
    """Objective gradients an oracle_online run computes: at steps 0, k, 2k, ... before --max_steps."""
    return math.ceil(max_steps / k)


def summary(record):
    """(final test PPL, final PPL on the final test set or None) of a run record."""
    return record["test_ppl"][-1], record.get("final_test_ppl_large")


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def paired(entries, baseline, column):
    """Mean of (entry - baseline) over the runs both have, and how many they are."""
    diffs = [e[column] - baseline[e["run"]][column] for e in entries
             if e["run"] in baseline and e[column] is not None and baseline[e["run"]][column] is not None]
    return mean(diffs), len(diffs)


def refresh_rows(entries, standard, study_online, study_k, max_steps):
    """One row per k (pure: numbers in, rows out). ``entries``: {k, run, ppl, ppl_large, selection_fe, seconds} per
    finished run; ``standard`` and ``study_online``: run -> {ppl, ppl_large} of the study's saved runs (oracle_online's
    at ``study_k``). Differences are this benchmark's run minus the saved run of the same index (negative: better)."""
    rows = []
    for k in sorted({e["k"] for e in entries}):
        mine = [e for e in entries if e["k"] == k]
        row = {"k": k, "gradients_per_run": gradients_per_run(max_steps, k), "runs": len(mine),
               "test_ppl": mean([e["ppl"] for e in mine]), "final_test_ppl_large": mean([e["ppl_large"] for e in mine]),
               "selection_fe_per_run": mean([e["selection_fe"] for e in mine]),
               "seconds_per_run": mean([e["seconds"] for e in mine])}
        row["vs_standard"], row["pairs_standard"] = paired(mine, standard, "ppl")
        row["vs_standard_large"], _ = paired(mine, standard, "ppl_large")
        if k == study_k:
            row["vs_study_online"], row["pairs_study_online"] = paired(mine, study_online, "ppl")
            row["vs_study_online_large"], _ = paired(mine, study_online, "ppl_large")
        rows.append(row)
    return rows


def markdown(rows, final_size):
    """The table of ``refresh_rows``."""
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    large = f"{final_size:,} contexts" if final_size else "final test set (none)"
    lines = [f"| refresh every k steps | objective gradients per run | runs | test PPL | test PPL, {large} | "
             f"vs standard (paired runs) | vs standard, {large} | vs the study's {METHOD} (paired runs) | "
             f"vs the study's {METHOD}, {large} | selection forward-equivalents per run | seconds per run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        online = "" if "vs_study_online" not in r else \
            f"{fmt(r['vs_study_online'], '+.4f')} ({r['pairs_study_online']})"
        online_large = "" if "vs_study_online" not in r else fmt(r["vs_study_online_large"], "+.4f")
        lines.append(f"| {r['k']} | {r['gradients_per_run']} | {r['runs']} | {fmt(r['test_ppl'], '.3f')} | "
                     f"{fmt(r['final_test_ppl_large'], '.3f')} | {fmt(r['vs_standard'], '+.3f')} "
                     f"({r['pairs_standard']}) | {fmt(r['vs_standard_large'], '+.3f')} | {online} | {online_large} | "
                     f"{fmt(r['selection_fe_per_run'], ',.0f')} | {fmt(r['seconds_per_run'], '.0f')} |")
    return "\n".join(lines)


def saved_run(path, fingerprint):
    """A study's run record, refused unless its fingerprint is the one this benchmark's configuration gives;
    None when the study has not made it (yet)."""
    if not os.path.exists(path):
        return None
    record = artifacts.read_json(path)
    artifacts.check_fingerprint(path, record, fingerprint)
    return record


def measure(cfg, pipeline, ks, runs, output_dir):
    """Every (k, run) of oracle_online on pipeline ``pipeline`` of the study ``cfg`` describes (its --output_dir,
    only read), each saved to ``output_dir`` when it finishes and loaded from there when it already has. Returns
    (entries, standard, study_online): see ``refresh_rows``. On the CPU, as the study ran (its runs' fingerprints
    name the device)."""
    device = torch.device("cpu")
    if not 0 <= pipeline < cfg.run.num_pipelines:
        raise IGFError(f"--pipeline {pipeline}: the study has pipelines 0 to {cfg.run.num_pipelines - 1}")
    # 0) the study's model, contexts, and the pipeline's labels and learner, loaded as the driver loads them
    model, _, sets, ids, _ = run_clm_igf.load_model_and_contexts(cfg, device)
    pipe = make_pipelines(cfg, sets)[pipeline]
    load_ig_pairs(cfg, pipe, sets, ids)
    run_learner(cfg, pipe, model, sets, ids, train_it=False, write=False)  # loaded and checked, never written
    check_learners(cfg, [pipe])
    # 1) the acceptance a_b and the rule's settings, as the driver gives them to oracle_online
    ft = replace(cfg.finetune, methods=[METHOD])
    inputs, about = selection_inputs(
        ft, cfg.ig, sets.train, pipe.learner, pipe.pairs, objective=pipe.objective, objective_id=sha(pipe.objective),
        scale=pipe.scale, sources=sets.sources["train"] if sets.sources is not None else None,
        num_sources=len(sets.source_names), validation=sets.validation, validation_id=sha(sets.validation),
        learner_cfg=cfg.learner)
    common = run_clm_igf.finetune_fingerprint(cfg, sets, ids)

    def fingerprint(method, ft_k, run):  # the driver's run fingerprint
        about_k = {**about, **control_settings([method], pipe.pairs, cfg.ig, ft_k, cfg.learner)}
        return {**common, "method": method, "selection": selection_fingerprint(ft_k, method, pipe.learner_fp, about_k),
                "stream": run_seed(cfg, pipeline, run)}

    # 2) the study's saved runs that ours pair with: standard's, and oracle_online's at the study's k
    out, shared = cfg.run.output_dir, cfg.run.pipeline_streams == "shared"
    standard, study_online = {}, {}
    for run in range(runs):
        path = artifacts.run_path(out, "standard", 0 if shared else pipeline, run)
        if (record := saved_run(path, fingerprint("standard", ft, run))) is not None:
            standard[run] = dict(zip(("ppl", "ppl_large"), summary(record)))
        path = artifacts.run_path(out, METHOD, pipeline, run)
        if (record := saved_run(path, fingerprint(METHOD, ft, run))) is not None:
            study_online[run] = dict(zip(("ppl", "ppl_large"), summary(record)))
    print(f"  the study's saved runs of pipeline {pipeline}: standard {sorted(standard)}, {METHOD} at k = "
          f"{ft.online_refresh_every} {sorted(study_online)}", flush=True)
    # 3) oracle_online at each k: the driver's fine-tuning loop, one run at a time, from the pretrained weights
    os.makedirs(output_dir, exist_ok=True)
    model.to(getattr(torch, ft.torch_dtype))
    snapshot, ppl_start = WeightSnapshot(model), None
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=ft.mixed_precision == "bf16")
    entries = []
    for run in range(runs):  # run-major: an interrupted benchmark has every k of its first runs
        for k in ks:
            ft_k = replace(ft, online_refresh_every=k)
            path, expected, seed = entry_path(output_dir, pipeline, k, run), fingerprint(METHOD, ft_k, run), \
                run_seed(cfg, pipeline, run)
            if os.path.exists(path):
                saved = artifacts.read_json(path)
                artifacts.check_fingerprint(path, saved, expected)
                print(f"  k = {k}, run {run}: saved in {path}", flush=True)
            else:
                snapshot.restore()
                if ppl_start is None:
                    ppl_start = perplexity(model, sets.test, ft.eval_batch_size, device)
                attach_model(inputs, {METHOD}, about, model, sets.train, pipe.pairs, ig_cfg=cfg.ig, ft=ft_k,
                             learner_cfg=cfg.learner, objective=pipe.objective, validation=sets.validation,
                             batch_size=cfg.ig.ig_eval_batch_size, device=device,
                             seed=stage_seed(cfg.run.seed, "finetune", pipeline))  # holds k for the rule
                t = time.perf_counter()
                stream = candidate_stream(len(sets.train), torch.Generator().manual_seed(seed))
                selection = make_selection(make_rule(METHOD, inputs, seed), stream, ft_k.batch_size, ft_k.max_steps)
                record = finetune_run(model, sets.train, sets.test, selection, method=METHOD, run=run, seed=seed,
                                      ppl_start=ppl_start, cfg=ft_k, device=device, autocast=autocast,
                                      final_test=sets.final_test)
                seconds = {**record.pop("seconds"), "wall": time.perf_counter() - t}
                saved = {"fingerprint": expected, "k": k, "pipeline": pipeline, "run": run, "record": record,
                         "seconds": seconds}
                artifacts.write_json(path, saved)
                print(f"  k = {k}, run {run}: test PPL {record['test_ppl'][-1]:.3f} in {seconds['wall']:.0f} s, "
                      f"saved in {path}", flush=True)
            record = saved["record"]
            ppl, ppl_large = summary(record)
            entries.append({"k": k, "run": run, "ppl": ppl, "ppl_large": ppl_large,
                            "selection_fe": sum(record["cost"]["selection"]) + record["cost"]["setup"],
                            "seconds": saved["seconds"]["wall"]})
    snapshot.restore()
    return entries, standard, study_online


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Any other flag is the driver's (run_clm_igf.py), as the study was run.")
    p.add_argument("--study", default="output_study", help="the study's output folder (the driver's --output_dir); "
                   "only read")
    p.add_argument("--preset", default="study", help="the driver's preset the study was run with")
    p.add_argument("--pipeline", type=int, default=0, help="whose objective set, learner and candidate streams")
    p.add_argument("--refresh_every", type=int, nargs="+", default=[1, 2, 4, 8, 24],
                   help="values of --online_refresh_every k to run (k >= --max_steps: the gradient once, at step 0)")
    p.add_argument("--runs", type=int, default=3, help="runs 0..N-1 of each k, paired with the study's runs")
    p.add_argument("--output_dir", default="output_refresh_every", help="one JSON file per finished (k, run)")
    p.add_argument("--json", default=None, help="also write the table's rows here")
    args, driver_flags = p.parse_known_args(argv)
    if min(args.refresh_every) < 1 or args.runs < 1:
        p.error("--refresh_every and --runs must be positive")
    args.refresh_every = sorted(set(args.refresh_every))  # a k given twice is one k (its runs counted once)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        p.error(f"--output_dir {args.output_dir} is a file; give a folder")
    for flag, path in (("--output_dir", args.output_dir), ("--json", args.json)):
        if path and touches(path, args.study):
            p.error(f"{flag} {path} lies in the study folder {args.study}, which this benchmark only reads")
    try:
        cfg = driver_config(["--preset", args.preset, *driver_flags, "--output_dir", args.study])
        if not os.path.isdir(args.study):
            raise IGFError(f"no study folder {args.study}: run the driver first")
        entries, standard, study_online = measure(cfg, args.pipeline, args.refresh_every, args.runs, args.output_dir)
    except IGFError as e:
        raise SystemExit(f"error: {e}") from None
    ft = cfg.finetune
    rows = refresh_rows(entries, standard, study_online, ft.online_refresh_every, ft.max_steps)
    final_size = cfg.data.size_final_test_set
    print(f"\n{METHOD} on pipeline {args.pipeline} of {args.study}: {ft.max_steps} steps of {ft.batch_size}, test "
          f"set {cfg.data.size_test_set} contexts; differences are this run minus the study's run of the same "
          "index (negative: lower perplexity)\n")
    print(markdown(rows, final_size), flush=True)
    if args.json:
        artifacts.write_json(args.json, {"rows": rows, "entries": entries, "pipeline": args.pipeline,
                                         "study": args.study, "study_refresh_every": ft.online_refresh_every,
                                         "max_steps": ft.max_steps, "size_final_test_set": final_size})
    return rows


if __name__ == "__main__":
    main()
