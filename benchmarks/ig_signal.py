"""Is the information-gain signal well above floating-point noise, and what does one pair cost?

For each single-step optimizer (e.g. sgd:5e-5, adam:5e-5) this measures, on the offline default (SmolLM2-135M,
books corpus, objective set 32 x 32 tokens):
  - IG of a few training contexts in float32 (as the pipeline computes it) and in float64 (reference);
  - their Pearson correlation and the median relative error of float32;
  - the spread of IG across contexts (std) against the float32 noise floor (how much the objective perplexity of
    the *same* weights moves when only the summation order changes: batch 32 vs batch 7);
  - seconds per IG pair in float32.

    python benchmarks/ig_signal.py --contexts 12 --configs sgd:5e-5 sgd:1e-3 adam:5e-5
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from igf import assets  # noqa: E402
from igf.config import EMBEDDED_BOOKS, EMBEDDED_MODEL, DataConfig  # noqa: E402
from igf.data import build_context_sets, load_raw_splits, tokenize_splits  # noqa: E402
from igf.estimators import make_estimator  # noqa: E402
from igf.information_gain import perplexity  # noqa: E402


def ig_values(model, name, lr, contexts, objective):
    """Exact IG of each context (one step of ``name`` at ``lr``) and the seconds per pair."""
    before = perplexity(model, objective, 32, "cpu")
    estimator = make_estimator("exact", model, name, lr, objective, before, 32, torch.device("cpu"))
    start = time.perf_counter()
    values = [estimator(x.unsqueeze(0))[0][0] for x in contexts]
    return values, (time.perf_counter() - start) / len(contexts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, default=12)
    p.add_argument("--size_objective_set", type=int, default=32)
    p.add_argument("--configs", nargs="+", default=["sgd:5e-5", "adam:5e-5"])
    p.add_argument("--no_float64", action="store_true", help="skip the float64 reference (much faster)")
    args = p.parse_args()

    d = DataConfig(model_name_or_path=EMBEDDED_MODEL, dataset_name=EMBEDDED_BOOKS,
                   size_objective_set=args.size_objective_set)
    files = assets.resolve_text_files(d)
    model, tok = assets.load_pretrained(assets.resolve_model_path(d.model_name_or_path), torch.float32)
    corpus = tokenize_splits(load_raw_splits(files["train"], files["validation"], files["test"]), tok)
    sets = build_context_sets(corpus, d.context_len, 16, 43)
    objective = sets.objective_set(d.size_objective_set, 42)[0]
    contexts = sets.train[torch.randperm(len(sets.train), generator=torch.Generator().manual_seed(44))[:args.contexts]]

    with torch.no_grad():
        noise = abs(perplexity(model, objective, 32, "cpu") - perplexity(model, objective, 7, "cpu"))
    print(f"float32 noise floor (objective PPL, batch 32 vs 7, same weights): {noise:.2e}")
    model64 = None if args.no_float64 else copy.deepcopy(model).double()
    print(f"{'config':<12} {'s/pair':>7} {'IG mean':>10} {'IG std':>10} {'std/noise':>10} {'r(f32,f64)':>11} "
          f"{'med rel err':>11}")
    for spec in args.configs:
        name, lr = spec.split(":")
        ig32, sec = ig_values(model, name, float(lr), contexts, objective)
        std = statistics.pstdev(ig32)
        row = f"{spec:<12} {sec:7.2f} {statistics.mean(ig32):10.4g} {std:10.4g} {std / max(noise, 1e-30):10.3g}"
        if model64 is not None:
            ig64, _ = ig_values(model64, name, float(lr), contexts.clone(), objective)
            r = stats.pearsonr(ig32, ig64)[0]
            rel = statistics.median(abs(a - b) / abs(b) for a, b in zip(ig32, ig64) if b != 0)
            row += f" {r:11.4f} {rel:11.2e}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
