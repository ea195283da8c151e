"""How fast does the information-gain signal go stale while the model fine-tunes?

Standard fine-tuning of a study pipeline (its run 0: the run's own candidate stream, optimizer and schedule), and at
each checkpoint t the first-order SGD IG of a fixed sample of pool contexts at the weights theta_t, with the
objective gradient recomputed there (igf/estimators.py CurrentIG, as oracle_online scores). Reports, per checkpoint:
the objective-set perplexity, the Spearman of IG at theta_t with IG at theta_0 and with the previous checkpoint's,
the overlap of the top half by IG with step 0's top half, and the King James share of that top half.

    python benchmarks/ig_drift.py --preset study --pipeline 0 --contexts 600 --checkpoints 0 4 8 12 16 24
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study_data import load_study, pipeline_objective, source_group_of  # noqa: E402

from igf.config import run_seed  # noqa: E402
from igf.estimators import CurrentIG  # noqa: E402
from igf.finetune import make_optimizer, optimizer_step  # noqa: E402
from igf.selection import candidate_stream  # noqa: E402


def top_half(values):
    """Indices of the top half by value (ties: lower index first)."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return set(order[: len(values) // 2])


def drift_table(checkpoints, igs, ppls, groups, group="kjv"):
    """The rows of the drift table from IG at each checkpoint (pure: lists in, rows out)."""
    rows, first = [], top_half(igs[0])
    for i, t in enumerate(checkpoints):
        top = top_half(igs[i])
        row = {"step": t, "objective_ppl": ppls[i],
               "spearman_vs_step0": float(stats.spearmanr(igs[i], igs[0]).statistic) if i else 1.0,
               "spearman_vs_previous": float(stats.spearmanr(igs[i], igs[i - 1]).statistic) if i else None,
               "top_half_overlap_with_step0": len(top & first) / len(first)}
        if groups is not None:
            row[f"{group}_share_of_top_half"] = sum(groups[j] == group for j in top) / len(top)
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="study", help="the driver's preset whose data, objective size and schedule "
                   "are used ('default': the quick start's)")
    p.add_argument("--pipeline", type=int, default=0, help="whose objective set and candidate stream")
    p.add_argument("--contexts", type=int, default=600, help="pool contexts labelled at every checkpoint")
    p.add_argument("--checkpoints", type=int, nargs="+", default=[0, 4, 8, 12, 16, 24], help="steps to label at")
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args(argv)

    cfg, model, sets = load_study(["--preset", args.preset])
    ft, device = cfg.finetune, torch.device("cpu")
    if max(args.checkpoints) > ft.max_steps:
        raise SystemExit(f"a checkpoint lies beyond the schedule's {ft.max_steps} steps")
    objective, _ = pipeline_objective(cfg, sets, args.pipeline)
    sample = torch.randperm(len(sets.train), generator=torch.Generator().manual_seed(0))[: args.contexts]
    contexts = sets.train[sample]
    groups = source_group_of(sets)
    groups = [groups[int(r)] for r in sample] if groups is not None else None
    stream = candidate_stream(len(sets.train), torch.Generator().manual_seed(run_seed(cfg, args.pipeline, 0)))
    optimizer, scheduler = make_optimizer(model, ft.learning_rate, ft.weight_decay, ft.warmup_steps, ft.max_steps)
    ig = CurrentIG(model, cfg.ig.ig_learning_rate, objective, cfg.ig.ig_eval_batch_size, device)
    torch.manual_seed(run_seed(cfg, args.pipeline, 0))
    igs, ppls, step, t0 = [], [], 0, time.perf_counter()
    for checkpoint in sorted(args.checkpoints):
        while step < checkpoint:
            optimizer_step(model, optimizer, scheduler, sets.train[[next(stream) for _ in range(ft.batch_size)]])
            step += 1
        ppls.append(float(np.exp(ig.refresh())))
        igs.append(torch.cat([ig(c) for c in contexts.split(cfg.ig.ig_eval_batch_size)]).tolist())
        print(f"  step {checkpoint}: objective PPL {ppls[-1]:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = drift_table(sorted(args.checkpoints), igs, ppls, groups)
    kjv = "kjv_share_of_top_half" in rows[0]
    sample_share = f" (sample: {sum(g == 'kjv' for g in groups) / len(groups):.0%})" if kjv else ""
    print(f"\n{args.contexts} pool contexts, pipeline {args.pipeline}'s objective set ({len(objective)}), "
          f"{ft.max_steps}-step schedule of --preset {args.preset}\n")
    print("| after step t | objective-set perplexity | IG at t vs IG at 0, Spearman | vs the previous checkpoint | "
          "top half by IG, overlap with step 0's |" + (f" KJV share of that top half{sample_share} |" if kjv else ""))
    print("|---|---|---|---|---|" + ("---|" if kjv else ""))
    for r in rows:
        prev = "" if r["spearman_vs_previous"] is None else f"{r['spearman_vs_previous']:.2f}"
        print(f"| {r['step']} | {r['objective_ppl']:.1f} | {r['spearman_vs_step0']:.2f} | {prev} | "
              f"{r['top_half_overlap_with_step0']:.2f} |" + (f" {r['kjv_share_of_top_half']:.0%} |" if kjv else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "contexts": args.contexts, "pipeline": args.pipeline, "preset": args.preset}, fh,
                      indent=1)


if __name__ == "__main__":
    main()
