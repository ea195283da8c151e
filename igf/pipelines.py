"""Pipelines: steps 1-3 of the method (objective set, IG pairs, secondary learner), once or replicated.

A pipeline is one objective set, the IG labels measured against it and the learner trained on them. With
``--num_pipelines K`` the driver repeats them with K independent seeds (igf/config.py ``stage_seed``), so the
results hold for the method, not for one learner: the test set and the fine-tuning candidate streams stay
shared, so run r of every pipeline still pairs with standard run r. Pipeline 0 is the single-pipeline run, in
the output folder itself; pipeline p >= 1 lives in ``<output_dir>/pipelines/<p>/`` with the same layout.

``run_ig_pairs`` labels (or resumes, or reuses) a pipeline's IG pairs; ``run_learner`` trains (or reuses) its
learner and records in the learner file what it was built on, so the filter (igf/filter.py) can apply it to new
text and refuse text cut for another LM; it also writes ``<pipeline folder>/learner/``, the learner as a folder
anyone can load with ``igf.Learner.from_pretrained`` (igf/learner.py), when that is missing or stale.
"""
import math
import os
from dataclasses import dataclass
from functools import partial

import torch

from . import artifacts
from .artifacts import sha
from .config import Config, stage_seed
from .errors import IGFError
from .estimators import collect_ig_pairs, ig_statistics, make_estimator
from .information_gain import perplexity, zscore
from .learner import save_learner_folder
from .secondary_learner import (
    SecondaryLearner,
    build_learner,
    describe_quality,
    exact_validation_metrics,
    gate_refusal,
    heldout_metrics,
    load_saved_learner,
    predict,
    token_feature_table,
    train_learner,
)
from .selection import REFERENCE_SIZE, score_scale

LEARNER_FORMAT = 2  # the learner file records what it was built on (version 1 held only weights and metrics)


@dataclass
class Pipeline:
    index: int
    folder: str  # where its ig_pairs.json, secondary_learner.* and runs/ are
    objective: torch.Tensor  # (N_obj, T) its objective set
    objective_rows: torch.Tensor  # (N_obj,) their rows in ContextSets.validation
    pairs: dict | None = None  # the saved IG pairs (with z-scores and statistics)
    learner: SecondaryLearner | None = None
    learner_fp: str | None = None  # hash of the learner's trained weights (in every run fingerprint)
    scale: tuple | None = None  # (mean, std) of the learner's predicted IG over the pool
    metrics: dict | None = None  # the learner's metrics (secondary_learner.json)
    labelled: bool = False  # this invocation computed IG labels (not only loaded them): see the driver's timings
    trained: bool = False  # ... and trained the learner

    def path(self, name):
        return os.path.join(self.folder, name)


def make_pipelines(cfg: Config, sets):
    """The --num_pipelines pipelines, each with its objective set sampled from the validation windows."""
    pipelines = []
    for p in range(cfg.run.num_pipelines):
        objective, rows = sets.objective_set(cfg.data.size_objective_set, stage_seed(cfg.run.seed, "objective_set", p))
        pipelines.append(Pipeline(p, artifacts.pipeline_dir(cfg.run.output_dir, p), objective, rows))
    return pipelines


def section(title, **sizes):
    print(f"\n=== {title} ===" + "".join(f"\n  {k:<24} {v}" for k, v in sizes.items()), flush=True)


def _tag(pipe, cfg):
    return f" (pipeline {pipe.index})" if cfg.run.num_pipelines > 1 else ""


# ----------------------------------------------------------------------------- 2) information gain

def ig_fingerprint(cfg: Config, pipe, sets, ids):
    """What the IG pairs depend on (the flags are listed too, so a refusal names them, not only hashes)."""
    d, ig = cfg.data, cfg.ig
    return {**ids, "train": sha(sets.train), "objective": sha(pipe.objective), "context_len": d.context_len,
            "size_objective_set": d.size_objective_set, "ig_optimizer": ig.ig_optimizer,
            "ig_learning_rate": ig.ig_learning_rate, "ig_eval_batch_size": ig.ig_eval_batch_size,
            "ig_estimator": ig.ig_estimator, "seed": cfg.run.seed, "pipeline": pipe.index}


PAIR_LISTS = ("pairs", "validation", "heldout")


def without_tokens(record):
    """The IG pairs as saved: each pair names its context by ``context_index`` (its row in the training pool, which
    the fingerprint's hash pins), not by its tokens, so ig_pairs.json holds no text and is a fifth of the size."""
    return {**record, **{key: [{k: v for k, v in p.items() if k != "tokens"} for p in record[key]]
                         for key in PAIR_LISTS if key in record}}


def with_tokens(saved, train, path):
    """Saved IG pairs with each context's tokens put back from the pool (files written before tokens were left
    out keep theirs, which must be that pool row's)."""
    if not isinstance(saved, dict):
        return saved  # check_fingerprint names what is wrong with it
    for key in PAIR_LISTS:
        for p in saved.get(key, []):
            row = p.get("context_index")
            if not isinstance(row, int) or not 0 <= row < len(train):
                raise IGFError(f"{path}: an IG pair names training context {row!r}, which this pool does not have; "
                               "use --overwrite_output_dir")
            tokens = train[row].tolist()
            if p.setdefault("tokens", tokens) != tokens:
                raise IGFError(f"{path}: IG pair {p.get('pair')} holds other tokens than training context {row}; "
                               "use --overwrite_output_dir")
    return saved


def label_order(cfg: Config, pipe, pool_size):
    """The pool rows in the order the pipeline's IG labels take them (a seeded permutation): the labels are its
    first --num_ig_pairs rows, the validation and held-out pairs come from its back."""
    return torch.randperm(pool_size, generator=torch.Generator().manual_seed(stage_seed(cfg.run.seed, "ig_pairs",
                                                                                        pipe.index)))


def reference_rows(cfg: Config, pipe, pool_size):
    """The pool rows on which an LM-scored static rule (ppl, oracle, color) reads the pool's quantiles: the first
    REFERENCE_SIZE contexts the labels take, labelled (IGF's acceptance) or not (--keep_fraction, where a
    learner-free rule's runs must not depend on whether this invocation labelled anything)."""
    if cfg.finetune.keep_fraction is None and pipe.pairs is not None:
        return [p["context_index"] for p in pipe.pairs["pairs"][:REFERENCE_SIZE]]
    return label_order(cfg, pipe, pool_size)[:REFERENCE_SIZE].tolist()


def run_ig_pairs(cfg: Config, pipe, model, sets, ids, device, launch):
    """Label (or resume, or reuse) the pipeline's IG pairs; returns the saved record with z-scores and statistics.

    ``pairs``: --num_ig_pairs training contexts labelled by --ig_estimator (the learner trains on them).
    ``heldout``: --num_heldout_pairs other training contexts labelled by --ig_estimator, never trained on: enough
    of them to score the learner with a tight confidence interval (the gate reads it).
    ``validation``: --num_validation_pairs other training contexts labelled with exact IG (and, for comparison,
    by the estimator): never trained on, they score the learner and the estimator against the real thing.
    """
    ig, path = cfg.ig, pipe.path(artifacts.IG_PAIRS)
    fingerprint = ig_fingerprint(cfg, pipe, sets, ids)
    saved = artifacts.read_json(path) if os.path.exists(path) else None
    wanted = {"pairs": ig.num_ig_pairs, "validation": ig.num_validation_pairs, "heldout": ig.num_heldout_pairs}
    if saved is not None:
        artifacts.check_fingerprint(path, saved, fingerprint)
        saved = with_tokens(saved, sets.train, path)  # the pool is the fingerprint's: its rows are the contexts
        for key, flag in (("pairs", "num_ig_pairs"), ("validation", "num_validation_pairs"),
                          ("heldout", "num_heldout_pairs")):
            if len(saved.get(key, [])) > wanted[key]:  # keeping a prefix would overwrite (lose) the rest
                raise IGFError(f"{path} holds {len(saved[key])} {key} pairs, more than --{flag} {wanted[key]}; "
                               f"pass --{flag} {len(saved[key])} to reuse them, or --overwrite_output_dir / "
                               "another --output_dir to start over")
    if sum(wanted.values()) > len(sets.train):
        raise IGFError(f"--num_ig_pairs {ig.num_ig_pairs} + --num_validation_pairs {ig.num_validation_pairs} + "
                       f"--num_heldout_pairs {ig.num_heldout_pairs} exceed the {len(sets.train)} training contexts")
    order = label_order(cfg, pipe, len(sets.train))
    # labels from the front of one permutation, validation from its back, then the held-out labels: prefix-stable
    # (a larger --num_ig_pairs extends the labels), never overlapping
    back = order.flip(0)
    indices = {"pairs": order[: ig.num_ig_pairs], "validation": back[: ig.num_validation_pairs],
               "heldout": back[ig.num_validation_pairs: ig.num_validation_pairs + ig.num_heldout_pairs]}
    # raw pairs only: z-scores are recomputed over the full set when it is complete
    done = {key: [{k: v for k, v in p.items() if k != "ig_z"} for p in (saved or {}).get(key, [])]
            for key in wanted}
    # held-out labels sit behind the validation pairs: another --num_validation_pairs moves them (cheap to redo)
    if [p["context_index"] for p in done["heldout"]] != indices["heldout"][: len(done["heldout"])].tolist():
        print("  the held-out labels were measured on other contexts (another --num_validation_pairs); "
              "measuring them again", flush=True)
        done["heldout"] = []
    section("2) information gain" + _tag(pipe, cfg),
            pairs=f"{len(done['pairs'])} saved, {ig.num_ig_pairs} wanted ({ig.ig_estimator})",
            heldout_pairs=f"{len(done['heldout'])} saved, {ig.num_heldout_pairs} wanted ({ig.ig_estimator})",
            validation_pairs=f"{len(done['validation'])} saved, {ig.num_validation_pairs} wanted (exact)",
            step=f"{ig.ig_optimizer}, lr {ig.ig_learning_rate}", objective_set=f"{len(pipe.objective)} contexts")
    incomplete = any(len(done[k]) < wanted[k] for k in wanted) or not (saved or {}).get("complete")
    pipe.labelled = incomplete
    ppl_before = perplexity(model, pipe.objective, ig.ig_eval_batch_size, device) if incomplete else \
        saved["ppl_before"]
    # 1e-4, not exact: another thread count or CPU type sums the float32 losses in another order (1 vs 2 threads:
    # 3e-9 relative; an AMD AVX2 CPU against the Intel AMX one that began the labels: 8.5e-6), which is no reason
    # to refuse a resume (the weights' hash in the fingerprint already says it is the same model)
    if saved is not None and not math.isclose(saved["ppl_before"], ppl_before, rel_tol=1e-4):
        raise IGFError(f"{path}: pretrained objective perplexity is {ppl_before}, saved {saved['ppl_before']}; "
                       "the model changed. Use --overwrite_output_dir")
    if saved is not None:  # the labels measured so far were measured from the saved value: the rest are too
        ppl_before = saved["ppl_before"]
    print(f"  pretrained objective-set perplexity {ppl_before:.4f}", flush=True)

    def sourced(pairs):  # each labelled context's source (its work, its file), where sources are known
        if sets.sources is None:
            return pairs
        return [{**p, "source": sets.source_names[int(sets.sources["train"][p["context_index"]])]} for p in pairs]

    def record(complete=False):
        out = {"fingerprint": fingerprint, "ppl_before": ppl_before, "estimator": ig.ig_estimator,
               "complete": complete, **{key: sourced(pairs) for key, pairs in done.items()}}
        if complete:
            z, mean, std = zscore([p["ig"] for p in done["pairs"]])
            out["pairs"] = [{**p, "ig_z": zi} for p, zi in zip(out["pairs"], z)]
            out["stats"] = {**ig_statistics(done["pairs"], done["validation"]), "ig_std": std}
        return out

    estimate = partial(make_estimator, model=model, optimizer_name=ig.ig_optimizer, lr=ig.ig_learning_rate,
                       objective=pipe.objective, ppl_before=ppl_before, batch_size=ig.ig_eval_batch_size,
                       device=device)
    if launch.is_main:
        os.makedirs(pipe.folder, exist_ok=True)
    write = artifacts.write_json if launch.is_main else (lambda *_: None)  # every process holds the same pairs
    checkpoint = dict(on_checkpoint=lambda _: write(path, without_tokens(record())), save_every=ig.ig_save_every,
                      launch=launch)
    if len(done["pairs"]) < ig.num_ig_pairs:
        collect_ig_pairs(estimate(ig.ig_estimator), sets.train, indices["pairs"], done["pairs"], **checkpoint)
    if len(done["heldout"]) < ig.num_heldout_pairs:
        collect_ig_pairs(estimate(ig.ig_estimator), sets.train, indices["heldout"], done["heldout"],
                         desc="held-out IG pairs", **checkpoint)
    if incomplete and ig.num_validation_pairs:
        if len(done["validation"]) < ig.num_validation_pairs:
            collect_ig_pairs(estimate("exact"), sets.train, indices["validation"], done["validation"],
                             desc="exact validation pairs", **checkpoint)
        # the estimator on the same contexts (cheap for first order; for exact it is the same number)
        estimates = [p["ig"] for p in collect_ig_pairs(estimate(ig.ig_estimator), sets.train, indices["validation"],
                                                       [], desc=f"{ig.ig_estimator} on validation", launch=launch)] \
            if ig.ig_estimator != "exact" else [p["ig"] for p in done["validation"]]
        done["validation"] = [{**p, "estimate": e} for p, e in zip(done["validation"], estimates)]
    result = record(complete=True)
    if incomplete:  # a complete file is left as it was (its statistics recomputed elsewhere may differ in a last bit)
        write(path, without_tokens(result))
    s = result["stats"]
    print(f"  IG over {s['n']} pairs ({ig.ig_estimator}): mean {s['ig_mean']:.4g}, std {s['ig_std']:.4g}, range "
          f"[{s['ig_min']:.4g}, {s['ig_max']:.4g}], positive {s['fraction_positive']:.0%}", flush=True)
    if s["n_validation"]:
        print(f"  on {s['n_validation']} exact validation pairs: {ig.ig_estimator} estimate vs exact "
              f"{_corr(s['estimator_vs_exact'])}; the context's own pretrained loss vs exact "
              f"{_corr(s['context_loss_vs_exact'])}", flush=True)
    pipe.pairs = result
    return result


def _corr(c):
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return f"Pearson {fmt(c['pearson'])}, Spearman {fmt(c['spearman'])}"


def load_ig_pairs(cfg, pipe, sets, ids):
    """The saved IG pairs for a later stage: refused unless made by this configuration (model, data, flags)."""
    path = pipe.path(artifacts.IG_PAIRS)
    if not os.path.exists(path):
        raise IGFError(f"{path} not found: run the ig_pairs stage first")
    saved = artifacts.read_json(path)
    artifacts.check_fingerprint(path, saved, ig_fingerprint(cfg, pipe, sets, ids))
    saved = with_tokens(saved, sets.train, path)
    n, n_val, n_held = (len(saved.get(k, [])) for k in ("pairs", "validation", "heldout"))
    if not saved.get("complete") or (n, n_val, n_held) != (cfg.ig.num_ig_pairs, cfg.ig.num_validation_pairs,
                                                           cfg.ig.num_heldout_pairs):
        raise IGFError(f"{path} is incomplete or holds {n} pairs, {n_val} validation and {n_held} held-out pairs, "
                       f"not --num_ig_pairs {cfg.ig.num_ig_pairs}, --num_validation_pairs "
                       f"{cfg.ig.num_validation_pairs} and --num_heldout_pairs {cfg.ig.num_heldout_pairs}: rerun "
                       "with the ig_pairs stage")
    pipe.pairs = saved
    return saved


# ----------------------------------------------------------------------------- 3) secondary learner

def learner_arch(ln):
    return dict(channels=ln.learner_channels, kernel_size=ln.learner_kernel_size, hidden=ln.learner_hidden,
                dropout=ln.learner_dropout, pooling=ln.learner_pooling)


def run_learner(cfg: Config, pipe, model, sets, ids, train_it, write=True):
    """Train (or reuse) the pipeline's secondary learner on its z-scored IG pairs; ``write=False`` only loads it.
    Sets ``pipe.learner``, ``pipe.learner_fp``, ``pipe.scale`` and ``pipe.metrics``."""
    ln, pairs = cfg.learner, pipe.pairs
    path = pipe.path(artifacts.LEARNER)
    scored_on = pairs["pairs"] + pairs.get("validation", []) + pairs.get("heldout", [])
    fingerprint = {**ids, "pairs": sha([[p["tokens"], p["ig"]] for p in scored_on]),
                   "learner": vars(ln), "seed": cfg.run.seed, "pipeline": pipe.index}
    embeddings = model.get_input_embeddings().weight
    # counted from the data (no LM pass): the pool's and the objective set's token frequencies
    features = token_feature_table(sets.train, pipe.objective, embeddings.shape[0]) \
        if ln.learner_token_features else None
    torch.manual_seed(stage_seed(cfg.run.seed, "learner", pipe.index))  # weight init and dropout
    learner = build_learner(embeddings, features, ln.learner_ensemble, **learner_arch(ln))
    saved = artifacts.read_torch(path) if os.path.exists(path) else None
    if saved is None and not train_it:
        raise IGFError(f"{path} not found: run the learner stage first")
    saved_fp = saved.get("fingerprint") if isinstance(saved, dict) else None
    # A learner of the same model on other pairs or settings is retrained when its stage runs (its old runs are
    # then refused by their fingerprint); one of another model, or an unreadable one, is refused.
    retrain = train_it and isinstance(saved_fp, dict) and saved_fp != fingerprint and all(
        saved_fp.get(k) == fingerprint[k] for k in ids)
    if retrain:
        print(f"  {path} was trained on other pairs or settings; retraining it", flush=True)
    elif saved is not None:
        artifacts.check_fingerprint(path, saved, fingerprint)
        learner = load_saved_learner(path, saved, embeddings, token_features=features)
        print(f"\n=== 3) secondary learner{_tag(pipe, cfg)} ===\n  reusing {path}", flush=True)
        if write:
            artifacts.write_json(pipe.path(artifacts.LEARNER_METRICS), saved["metrics"])
        scale = saved.get("scale")
        pipe.scale = (scale["mean"], scale["std"]) if scale else score_scale(predict(learner, sets.train))
        _finish(pipe, learner, saved["metrics"])
        if write:  # the shareable folder, if it is missing or was written for another learner
            save_learner_folder(cfg, pipe, sets, ids, fingerprint)
        return learner
    tokens = torch.tensor([p["tokens"] for p in pairs["pairs"]])  # (N, T)
    z = torch.tensor([p["ig_z"] for p in pairs["pairs"]], dtype=torch.float32)  # (N,)
    section("3) secondary learner" + _tag(pipe, cfg), pairs=len(z), trainable_parameters=sum(
        p.numel() for p in learner.parameters() if p.requires_grad), epochs=ln.learner_epochs)
    g = torch.Generator().manual_seed(stage_seed(cfg.run.seed, "learner", pipe.index))
    metrics = train_learner(learner, tokens, z, ln.learner_val_fraction, ln.learner_epochs,
                            ln.learner_learning_rate, ln.learner_batch_size, g, weight_decay=ln.learner_weight_decay)
    metrics.update(exact_validation_metrics(learner, pairs), **heldout_metrics(learner, pairs))
    pipe.trained = True
    pool = predict(learner, sets.train)  # (N_pool,) predicted IG of the training pool
    pipe.scale = score_scale(pool)  # the pool's z scale of predicted IG
    artifacts.write_json(pipe.path(artifacts.LEARNER_METRICS), metrics)
    artifacts.write_torch(path, {
        "format": LEARNER_FORMAT, "fingerprint": fingerprint, "state": learner.trainable_state(),
        "arch": learner_arch(ln), "ensemble": ln.learner_ensemble, "metrics": metrics,
        # what it was built on: the filter refuses text cut for another LM, tokenizer or context length
        "built_on": {"model": ids["model"], "tokenizer": ids["tokenizer"], "context_len": cfg.data.context_len},
        "scale": {"mean": pipe.scale[0], "std": pipe.scale[1]},
        "token_features": features})
    r = {k: "n/a" if v is None else f"{v:.3f}" for k, v in metrics.items() if k.endswith(("pearson", "spearman"))}
    print(f"  held-out labels: Pearson {r['val_pearson']}, Spearman {r['val_spearman']} (n={metrics['n_val']}, "
          f"best epoch {metrics['best_epoch']}); training labels: Pearson {r['train_pearson']}", flush=True)
    if metrics.get("n_exact"):
        print(f"  held-out EXACT IG (n={metrics['n_exact']}): learner Pearson {r['exact_pearson']}, Spearman "
              f"{r['exact_spearman']}; the context's own pretrained loss alone: Spearman "
              f"{r['context_loss_spearman']}", flush=True)
    if metrics.get("n_heldout"):
        members = metrics.get("heldout_spearman_per_member")
        print(f"  quality: {describe_quality(metrics)}"
              + (f"; members {', '.join(f'{v:.3f}' for v in members)}" if members else "")
              + f"; the context's own pretrained loss alone: Spearman {metrics['heldout_context_loss_spearman']:.3f}",
              flush=True)
    _finish(pipe, learner, metrics)
    if write:
        save_learner_folder(cfg, pipe, sets, ids, fingerprint, pool)  # <pipeline folder>/learner/, shareable
    return learner


def check_learners(cfg: Config, pipelines):
    """The gate, before any fine-tuning: refuse (IGFError, exit 2) every pipeline whose learner does not rank
    held-out IG better than chance, unless --allow_weak_learner."""
    for pipe in pipelines:
        refusal = gate_refusal(pipe.metrics, f"pipeline {pipe.index}'s secondary learner")
        if refusal and not cfg.run.allow_weak_learner:
            raise IGFError(refusal)
        if refusal:
            print(f"  warning (--allow_weak_learner): {refusal}", flush=True)


def _finish(pipe, learner, metrics):
    pipe.learner, pipe.metrics = learner, metrics
    pipe.learner_fp = artifacts.trained_sha(learner.trainable_state())
    return learner
