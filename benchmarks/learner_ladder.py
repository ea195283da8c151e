"""What a secondary learner's quality depends on: label budget, objective-set size, ensemble size, learning rate.

Reads the labels of a finished study (``--study``, the folder of ``make study``: per pipeline 4,000 first-order
labels against a 100-context objective set, 500 held-out labels, 40 exact pairs) and trains learners on nested
prefixes of each pipeline's labels, so the whole ladder costs about its largest rung. Every learner is scored on
the same 500 held-out labels of its pipeline (objective set 100, never trained on), beside the one-number rival,
the context's own pretrained loss. Optionally (``--objective32``) the same contexts labelled against a 32-context
objective set, as the quick start does:

    python run_clm_igf.py --preset study --size_objective_set 32 --num_ig_pairs 1000 --stages ig_pairs \\
        --output_dir output_ladder32
    python benchmarks/learner_ladder.py --study output_study --objective32 output_ladder32

For each rung it prints the held-out Spearman (mean over pipelines, and its spread split into the learner's seed
and the pipeline), the best epoch, and what the learners keep from the training pool at IGF's constant threshold
(predicted IG above the pool's mean): one source group's share (``--group``, the King James Bible's by default)
and the Jaccard overlap of two learners' kept pools (two seeds, or two independent ensembles). Needs no LM: the
embedding table and tokenizer come from the study's learner folder, the pool from its data. Every learner's
numbers go to ``--output`` as they are measured, so an interrupted ladder resumes where it stopped; a record is
reused only for the rung, ``--epochs``, ``--patience`` and the labels it was made from (a hash of the study's and
``--objective32``'s label files), so another setting or study folder trains anew and the table shows only records
of the current ones.
"""
import argparse
import base64
import itertools
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from igf import artifacts  # noqa: E402
from igf.artifacts import sha  # noqa: E402
from igf.assets import resolve_text_files  # noqa: E402
from igf.config import DataConfig, LearnerConfig  # noqa: E402
from igf.data import build_context_sets, load_raw_splits, tokenize_splits  # noqa: E402
from igf.information_gain import zscore  # noqa: E402
from igf.learner import Learner  # noqa: E402
from igf.pipelines import learner_arch, with_tokens  # noqa: E402
from igf.secondary_learner import build_learner, predict, train_learner  # noqa: E402
from igf.statistics import correlations, variance_components  # noqa: E402


def load_pipelines(folder):
    """{pipeline index: its saved IG pairs} of a study folder (pipeline 0 in the folder itself)."""
    out, p = {}, 0
    while os.path.exists(path := os.path.join(artifacts.pipeline_dir(folder, p), artifacts.IG_PAIRS)):
        out[p] = artifacts.read_json(path)
        p += 1
    return out


def labels_id(labels, study_labels):
    """What a learner's record depends on among the files read: the labels it trained on and the held-out labels
    it was scored on (their fingerprints and contents, so a relabelled or another study folder is told apart)."""
    return sha({"train": [labels["fingerprint"], sha([[p["tokens"], p["ig"]] for p in labels["pairs"]])],
                "heldout": [study_labels["fingerprint"], sha([[p["context_index"], p["ig"]]
                                                              for p in study_labels["heldout"]])]})


def pool_and_sources(study, tokenizer, train_sha):
    """The training pool (N, T) the study labelled and the name of each context's source ("" when unknown): the
    data of the study's config.json (written when a run completes), else the offline default; checked against the
    pool's hash in the labels (``train_sha``)."""
    path = os.path.join(study, artifacts.CONFIG)
    d = DataConfig(**{k: v for k, v in artifacts.read_json(path)["data"].items() if k in DataConfig.__annotations__}) \
        if os.path.exists(path) else DataConfig()
    files = resolve_text_files(d)
    raw = load_raw_splits(files["train"], files["validation"], files["test"]) if files else load_raw_splits(
        dataset_name=d.dataset_name, dataset_config_name=d.dataset_config_name, text_column=d.text_column,
        source_column=d.source_column)
    sets = build_context_sets(tokenize_splits(raw, tokenizer), d.context_len, d.size_test_set, 0)  # any test seed:
    if sha(sets.train) != train_sha:  # the pool leaves out every test window, sampled or not
        raise SystemExit(f"the training pool of {study}'s data is not the one its labels were measured on")
    if sets.sources is None:
        return sets.train, np.full(len(sets.train), "")
    return sets.train, np.array([sets.source_names[int(i)] for i in sets.sources["train"]])


def train(embeddings, pairs, budget, ensemble, lr, epochs, patience, seed):
    """A learner trained as igf/pipelines.py trains one, on the first ``budget`` labels (z-scored over them)."""
    ln = LearnerConfig(learner_learning_rate=lr, learner_epochs=epochs, learner_ensemble=ensemble)
    rows = pairs[:budget]
    tokens = torch.tensor([p["tokens"] for p in rows])
    z = torch.tensor(zscore([p["ig"] for p in rows])[0], dtype=torch.float32)
    torch.manual_seed(seed)
    learner = build_learner(embeddings, None, ensemble, **learner_arch(ln))
    metrics = train_learner(learner, tokens, z, ln.learner_val_fraction, epochs, lr, ln.learner_batch_size,
                            torch.Generator().manual_seed(seed), patience=patience or None)
    return learner, metrics


def kept(learner, tables, pool):
    """IGF's constant threshold 0 on standardized scores: the pool contexts predicted above the pool's mean."""
    scores = predict(learner, pool, tables=tables).double()
    return (scores > scores.mean()).numpy()


def jaccard(a, b):
    return float((a & b).sum() / (a | b).sum())


def rank(learner, tables, rows):
    predicted = predict(learner, torch.tensor([r["tokens"] for r in rows]), tables=tables)
    return correlations(predicted, [r["ig"] for r in rows])["spearman"]


def pack(mask):
    return base64.b64encode(np.packbits(mask).tobytes()).decode()


def unpack(text, n):
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)


def make_rungs(args, small):
    """(objective set, label budget, ensemble size, learning rate) of every rung."""
    lr0, top = args.learning_rates[0], max(args.budgets)
    rungs = [("100", b, m, lr0) for m in (1, args.ensemble) for b in args.budgets]
    rungs += [("100", top, m, lr) for lr in args.learning_rates[1:] for m in (1, args.ensemble)]
    if small:
        rungs += [("32", min(len(small[min(small)]["pairs"]), top), m, lr0) for m in (1, args.ensemble)]
    return list(dict.fromkeys(rungs))  # --ensemble 1 names every single rung twice


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="output_study", help="a study folder (make study)")
    p.add_argument("--objective32", default=None, help="labels of the same contexts against 32 objective contexts")
    p.add_argument("--budgets", type=int, nargs="+", default=[250, 1000, 4000])
    p.add_argument("--seeds", type=int, default=3, help="single learners per rung and pipeline (the seed spread)")
    p.add_argument("--ensemble", type=int, default=5, help="members of the ensemble rungs (two ensembles each)")
    p.add_argument("--learning_rates", type=float, nargs="+", default=[1e-3, 1e-4],
                   help="learner learning rates of the single and ensemble rungs at the largest budget (the first "
                        "is every other rung's)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--patience", type=int, default=10,
                   help="stop a learner after this many epochs without a better validation loss (0: every epoch, "
                        "as the pipeline trains)")
    p.add_argument("--pipelines", type=int, nargs="*", default=None, help="which pipelines (default: all)")
    p.add_argument("--group", default="kjv", help="the source group whose kept share is reported (the part of a "
                   "source's name before '/'; the books' King James Bible by default, whose share the first study "
                   "found to carry IGF's gain)")
    p.add_argument("--output", default="learner_ladder.json",
                   help="every learner's numbers (JSON); rerunning resumes from it")
    args = p.parse_args(argv)

    study = load_pipelines(args.study)
    small = load_pipelines(args.objective32) if args.objective32 else {}
    chosen = sorted(study) if args.pipelines is None else args.pipelines
    folder = os.path.join(args.study, artifacts.LEARNER_FOLDER)
    shared = Learner.from_pretrained(folder)
    embeddings = shared.model.embed.weight  # the LM's input embeddings, from the folder: no LM load
    pool, sources = pool_and_sources(args.study, shared.tokenizer, study[0]["fingerprint"]["train"])
    for folder, labels in ((args.study, study), (args.objective32, small)):  # tokens back from the pool
        for p, pairs in labels.items():
            with_tokens(pairs, pool, os.path.join(artifacts.pipeline_dir(folder, p), artifacts.IG_PAIRS))
    print(f"pool {len(pool):,} contexts; pipelines {chosen}; CPU threads {torch.get_num_threads()}", flush=True)
    rungs = make_rungs(args, small)
    records = artifacts.read_json(args.output) if os.path.exists(args.output) else []
    # a record is reused only for everything it depends on: the rung, the training settings and the labels read
    # (their fingerprints: another --study or --objective32 folder, or the same one relabelled, is another record)
    key = lambda r: (r["pipeline"], r["objective"], r["budget"], r["ensemble"], r["lr"], r["draw"],  # noqa: E731
                     r.get("epochs"), r.get("patience"), r.get("labels"))
    done = {key(r) for r in records}
    for pipe in chosen:
        heldout, exact = study[pipe]["heldout"], study[pipe]["validation"]
        loss_rho = correlations([math.log(r["context_ppl"]) for r in heldout], [r["ig"] for r in heldout])["spearman"]
        for objective, budget, ensemble, lr in rungs:
            labels = (small if objective == "32" else study).get(pipe)
            if labels is None:
                continue
            if [r["context_index"] for r in labels["heldout"]] != [r["context_index"] for r in heldout]:
                raise SystemExit(f"pipeline {pipe}: the objective-32 labels are not on the study's contexts")
            read = labels_id(labels, study[pipe])
            for s in range(2 if ensemble > 1 else args.seeds):
                if (pipe, objective, budget, ensemble, lr, s, args.epochs, args.patience, read) in done:
                    continue
                start = time.perf_counter()
                learner, m = train(embeddings, labels["pairs"], budget, ensemble, lr, args.epochs, args.patience,
                                   seed=10_000 * pipe + 100 * s + ensemble)
                tables = learner.token_tables()  # once per learner, for every set it scores
                keep = kept(learner, tables, pool)
                rec = {"pipeline": pipe, "objective": objective, "budget": budget, "ensemble": ensemble, "lr": lr,
                       "draw": s, "heldout_spearman": rank(learner, tables, heldout),
                       "exact_spearman": rank(learner, tables, exact),
                       "loss_spearman": loss_rho, "best_epochs": m.get("best_epochs", [m["best_epoch"]]),
                       "epochs": args.epochs, "patience": args.patience, "labels": read,
                       "group_share": float(np.char.startswith(sources[keep], args.group + "/").mean()),
                       "shares": {n: float((sources[keep] == n).mean()) for n in np.unique(sources)},  # per work
                       "seconds": time.perf_counter() - start, "kept": pack(keep)}
                if objective == "32":  # also against its own (noisier) held-out labels
                    rec["own_heldout_spearman"] = rank(learner, tables, labels["heldout"])
                records.append(rec)
                artifacts.write_json(args.output, records)  # atomic: an interrupted ladder resumes
                print(f"  p{pipe} obj {objective} n {budget} M {ensemble} lr {lr:g} #{s}: held-out "
                      f"{rec['heldout_spearman']:.3f} exact {rec['exact_spearman']:.3f} best epoch "
                      f"{m['best_epoch']} {args.group} share {rec['group_share']:.2f} ({rec['seconds']:.0f} s)",
                      flush=True)
    current = {p: labels_id((small if o == "32" else study)[p], study[p]) for p in chosen for o in ("100", "32")
               if p in (small if o == "32" else study)}
    print_table([{**r, "_keep": unpack(r["kept"], len(pool))} for r in records if r["pipeline"] in chosen and
                 (r.get("epochs"), r.get("patience")) == (args.epochs, args.patience) and
                 r.get("labels") in current.values()], rungs, args.group)
    return records


def print_table(records, rungs, group):
    print("\n| objective set | labels | learner | lr | held-out Spearman, mean over pipelines | seed SD | pipeline SD "
          f"| best epoch | {group} share kept | {group} share, two draws apart | Jaccard of two kept pools "
          "| source shares apart |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for objective, budget, ensemble, lr in rungs:
        rows = [r for r in records if (r["objective"], r["budget"], r["ensemble"], r["lr"]) ==
                (objective, budget, ensemble, lr)]
        if not rows:  # e.g. --seeds 0: the ensembles alone
            continue
        by_pipe = {}
        for r in rows:
            by_pipe.setdefault(r["pipeline"], []).append(r)
        table = [[r["heldout_spearman"] for r in rs] for rs in by_pipe.values()]
        comp = variance_components(table)
        pairs = [(a, b) for rs in by_pipe.values() for a, b in itertools.combinations(rs, 2)]
        jac = [jaccard(a["_keep"], b["_keep"]) for a, b in pairs]
        gap = [abs(a["group_share"] - b["group_share"]) for a, b in pairs]
        apart = [max(abs(a["shares"][n] - b["shares"][n]) for n in a["shares"]) for a, b in pairs]  # per work
        shares = [r["group_share"] for r in rows]
        epochs = sorted(e for r in rows for e in r["best_epochs"])
        name = "single" if ensemble == 1 else f"ensemble of {ensemble}"
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {objective} | {budget:,} | {name} | {lr:g} | {comp['mean']:.3f} | {fmt(comp['within_sd'])} | "
              f"{fmt(comp['between_sd'])} | {epochs[len(epochs) // 2]} ({epochs[0]}-{epochs[-1]}) | "
              f"{min(shares):.2f}-{max(shares):.2f} | {np.mean(gap):.3f} (max {max(gap):.3f}) | "
              f"{np.mean(jac):.2f} (min {min(jac):.2f}) | "
              f"{np.mean(apart):.3f} (max {max(apart):.3f}) |")
    loss = {r["pipeline"]: r["loss_spearman"] for r in records}
    print(f"\nthe context's own pretrained loss on the same held-out labels: {np.mean(list(loss.values())):.3f} "
          f"(per pipeline {', '.join(f'{v:.3f}' for v in loss.values())})")
    small = [r for r in records if "own_heldout_spearman" in r]
    if small:
        print("objective-32 learners on their own objective-32 held-out labels: "
              f"{np.mean([r['own_heldout_spearman'] for r in small]):.3f}")


if __name__ == "__main__":
    main()
