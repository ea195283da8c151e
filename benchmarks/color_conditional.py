"""Choosing CoLoR-Filter's conditional model without the test set: for each (steps, learning rate), fine-tune a copy
of the LM on a study pipeline's objective set (igf/finetune.py conditional_model, as the color rule does) and
report what it is chosen on:

  - held-out objective loss: mean NLL of validation contexts outside the objective set (a seeded sample);
  - Spearman of the color score (prior loss - conditional loss) with the pipeline's held-out IG labels (the
    labels the learner never trains on) and with its exact IG pairs;
  - LM forward-equivalents and seconds of the fine-tuning.

    python benchmarks/color_conditional.py --pipeline 0 --steps 12 24 48 --learning_rates 1e-4 3e-4
"""
import argparse
import json
import os
import sys
import time

import torch
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study_data import load_study, pipeline_objective, saved_labels  # noqa: E402

from igf.finetune import conditional_model  # noqa: E402
from igf.information_gain import context_losses  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default="output_study", help="the study folder whose labels score the choice")
    p.add_argument("--pipeline", type=int, default=0, help="the pipeline whose objective set and labels are used")
    p.add_argument("--steps", type=int, nargs="+", default=[12, 24, 48], help="conditional fine-tuning steps")
    p.add_argument("--learning_rates", type=float, nargs="+", default=[1e-4, 3e-4], help="its peak learning rates")
    p.add_argument("--batch_size", type=int, default=8, help="contexts per step (the study's --batch_size)")
    p.add_argument("--heldout_validation", type=int, default=256, help="validation contexts for the held-out loss")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)

    cfg, model, sets = load_study(["--preset", "study", "--output_dir", args.output_dir])
    objective, rows = pipeline_objective(cfg, sets, args.pipeline)
    pairs = saved_labels(cfg, sets, args.pipeline, objective)
    if pairs is None or not pairs.get("heldout"):
        raise SystemExit(f"no held-out labels for pipeline {args.pipeline} in {args.output_dir}: run its ig_pairs "
                         "stage")
    rest = torch.ones(len(sets.validation), dtype=torch.bool)
    rest[rows] = False
    g = torch.Generator().manual_seed(0)
    others = sets.validation[rest][torch.randperm(int(rest.sum()), generator=g)[: args.heldout_validation]]
    heldout = torch.tensor([q["tokens"] for q in pairs["heldout"]])
    exact = torch.tensor([q["tokens"] for q in pairs["validation"]])
    device, bs = torch.device("cpu"), 8
    prior = {"others": context_losses(model, others, bs, device), "heldout": context_losses(model, heldout, bs, device),
             "exact": context_losses(model, exact, bs, device)}
    print(f"pipeline {args.pipeline}: objective {len(objective)}, held-out labels {len(heldout)}, exact pairs "
          f"{len(exact)}, held-out validation contexts {len(others)}; prior held-out loss "
          f"{prior['others'].mean():.4f}", flush=True)
    rho = stats.spearmanr(-prior["heldout"], [q["ig"] for q in pairs["heldout"]]).statistic
    print(f"  (the prior's own loss alone, negated, vs held-out labels: Spearman {rho:.3f})", flush=True)
    out = []
    print("| steps | learning rate | held-out validation loss | color vs held-out labels (Spearman) | color vs exact "
          "IG | forward-equivalents | seconds |\n|---|---|---|---|---|---|---|", flush=True)
    for lr in args.learning_rates:
        for steps in args.steps:
            t = time.perf_counter()
            conditional, fe = conditional_model(model, objective, steps, lr, args.batch_size, 0, device)
            seconds = time.perf_counter() - t
            loss = context_losses(conditional, others, bs, device).mean().item()
            score = {k: prior[k] - context_losses(conditional, x, bs, device) for k, x in
                     (("heldout", heldout), ("exact", exact))}
            row = {"steps": steps, "learning_rate": lr, "heldout_validation_loss": loss,
                   "spearman_heldout_labels": stats.spearmanr(score["heldout"], [q["ig"] for q in pairs["heldout"]])
                   .statistic,
                   "spearman_exact": stats.spearmanr(score["exact"], [q["ig"] for q in pairs["validation"]]).statistic,
                   "forward_equivalents": fe, "seconds": seconds}
            out.append(row)
            print(f"| {steps} | {lr:g} | {loss:.4f} | {row['spearman_heldout_labels']:.3f} | "
                  f"{row['spearman_exact']:.3f} | {fe:,.0f} | {seconds:.0f} |", flush=True)
            del conditional
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
