#!/usr/bin/env python
"""Information Gain Filtration (Antonello, Beckage, Turek, Huth, ACL 2021), end to end.

    python run_clm_igf.py                      # offline default: SmolLM2-135M on public-domain books, CPU
    python run_clm_igf.py --preset paper --model_name_or_path openai-community/gpt2 \\
        --dataset_name wikitext --dataset_config_name wikitext-103-raw-v1      # paper scale, needs the hub

Stages, as in the paper: 1) objective set, 2) information-gain pairs, 3) secondary learner, 4) standard and IGF
fine-tuning over seeded runs, 5) statistics and figure. Every artifact goes to --output_dir (see igf/artifacts.py)
and is reused when the same command is run again, so an interrupted run resumes where it stopped.
"""
import glob
import hashlib
import json
import math
import os
import sys
import time
from functools import partial

import torch
from tqdm.auto import tqdm

from igf import artifacts, assets
from igf.config import SEED_OFFSETS, Config, parse_args
from igf.data import build_context_sets, load_raw_splits, tokenize_splits
from igf.distributed import Launch, OutputLock
from igf.errors import IGFError
from igf.estimators import collect_ig_pairs, ig_statistics, make_estimator
from igf.finetune import finetune_run
from igf.information_gain import WeightSnapshot, perplexity, zscore
from igf.plot import plot_results
from igf.secondary_learner import SecondaryLearner, exact_validation_metrics, token_feature_table, train_learner
from igf.selection import (
    CONTROLS,
    IGF_METHODS,
    candidate_stream,
    make_lm_scorers,
    make_rule,
    select_batches,
    selection_fingerprint,
    selection_inputs,
)
from igf.statistics import compare_methods, markdown_table


def sha(obj):
    """Short content hash of a tensor, bytes or JSON-able object (fingerprints of what an artifact depends on)."""
    if isinstance(obj, torch.Tensor):
        data = obj.contiguous().numpy().tobytes()
    elif isinstance(obj, bytes):
        data = obj
    else:
        data = json.dumps(obj, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def weights_sha(model):
    """Hash of every parameter's bytes: another checkpoint under the same name is a different model."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def file_sha(path):
    with open(path, "rb") as fh:
        return sha(fh.read())


def resolve_device(name, launch):
    """The device of this process: --device, or with 'auto' the launcher's choice (cuda:<local rank>), else cuda
    when available, else cpu."""
    if name == "auto":
        return launch.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise IGFError(f"--device {name} requested but CUDA is not available")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise IGFError(f"unknown --device {name!r}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise IGFError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def section(title, **sizes):
    print(f"\n=== {title} ===" + "".join(f"\n  {k:<24} {v}" for k, v in sizes.items()), flush=True)


# ----------------------------------------------------------------------------- 0) model and contexts

def load_model_and_contexts(cfg: Config, device):
    d = cfg.data
    path = assets.resolve_model_path(d.model_name_or_path, d.cache_dir)
    positions = assets.max_positions(assets.load_model_config(path))
    if positions and d.context_len > positions:
        raise IGFError(f"--context_len {d.context_len} exceeds the model's maximum positions ({positions})")
    files = assets.resolve_text_files(d)
    raw = load_raw_splits(**(dict(train_file=files["train"], validation_file=files["validation"],
                                   test_file=files["test"]) if files else
                             dict(dataset_name=d.dataset_name, dataset_config_name=d.dataset_config_name,
                                  text_column=d.text_column)))
    model, tokenizer = assets.load_pretrained(path, torch.float32)  # float32: IG needs it (igf/information_gain.py)
    model.to(device)
    streams = tokenize_splits(raw, tokenizer)
    sources = {s: files[s] if files else f"split {s!r} of {d.dataset_name}" for s in streams}
    sets = build_context_sets(streams, d.context_len, d.size_objective_set, d.size_test_set,
                              cfg.run.seed + SEED_OFFSETS["objective_set"], cfg.run.seed + SEED_OFFSETS["test_set"],
                              sources)
    data_id = {s: file_sha(p) for s, p in files.items()} if files else [d.dataset_name, d.dataset_config_name]
    vocab, width = model.get_input_embeddings().weight.shape  # named in a refusal, not only the config's hash
    architecture = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}  # not where it lies
    model_id = {"model": d.model_name_or_path, "config": sha(architecture), "weights": weights_sha(model),
                "vocab": vocab, "embedding_dim": width}
    n_params = sum(p.numel() for p in model.parameters())
    section("data and model", model=f"{d.model_name_or_path} ({n_params:,} parameters)", device=str(device),
            **{f"{s} tokens": f"{len(streams[s]):,} ({sources[s]})" for s in streams},
            **{f"{k} contexts": f"{v[0]:,} x {v[1]} tokens" for k, v in sets.summary().items()})
    summary = {"sources": sources, "tokens": {s: len(streams[s]) for s in streams}, "contexts": sets.summary(),
               "model_parameters": n_params}
    return model, sets, {"model": model_id, "data": data_id, "device": device.type}, summary


# ----------------------------------------------------------------------------- 2) information gain

def ig_fingerprint(cfg: Config, sets, ids):
    """What the IG pairs depend on (the flags are listed too, so a refusal names them, not only hashes)."""
    d, ig = cfg.data, cfg.ig
    return {**ids, "train": sha(sets.train), "objective": sha(sets.objective), "context_len": d.context_len,
            "size_objective_set": d.size_objective_set, "ig_optimizer": ig.ig_optimizer,
            "ig_learning_rate": ig.ig_learning_rate, "ig_eval_batch_size": ig.ig_eval_batch_size,
            "ig_estimator": ig.ig_estimator, "seed": cfg.run.seed}


def run_ig_pairs(cfg: Config, model, sets, ids, device, launch):
    """Label (or resume, or reuse) the IG pairs; returns the saved record with z-scores and statistics.

    ``pairs``: --num_ig_pairs training contexts labelled by --ig_estimator (the learner trains on them).
    ``validation``: --num_validation_pairs other training contexts labelled with exact IG (and, for comparison,
    by the estimator): never trained on, they score the learner and the estimator against the real thing.
    """
    ig, path = cfg.ig, os.path.join(cfg.run.output_dir, artifacts.IG_PAIRS)
    fingerprint = ig_fingerprint(cfg, sets, ids)
    saved = artifacts.read_json(path) if os.path.exists(path) else None
    wanted = {"pairs": ig.num_ig_pairs, "validation": ig.num_validation_pairs}
    if saved is not None:
        artifacts.check_fingerprint(path, saved, fingerprint)
        for key, flag in (("pairs", "num_ig_pairs"), ("validation", "num_validation_pairs")):
            if len(saved.get(key, [])) > wanted[key]:  # keeping a prefix would overwrite (lose) the rest
                raise IGFError(f"{path} holds {len(saved[key])} {key} pairs, more than --{flag} {wanted[key]}; "
                               f"pass --{flag} {len(saved[key])} to reuse them, or --overwrite_output_dir / "
                               "another --output_dir to start over")
    if ig.num_ig_pairs + ig.num_validation_pairs > len(sets.train):
        raise IGFError(f"--num_ig_pairs {ig.num_ig_pairs} + --num_validation_pairs {ig.num_validation_pairs} exceed "
                       f"the {len(sets.train)} training contexts")
    g = torch.Generator().manual_seed(cfg.run.seed + SEED_OFFSETS["ig_pairs"])
    order = torch.randperm(len(sets.train), generator=g)
    # labels from the front of one permutation, validation from its back: both prefix-stable, never overlapping
    indices = {"pairs": order[: ig.num_ig_pairs], "validation": order.flip(0)[: ig.num_validation_pairs]}
    # raw pairs only: z-scores are recomputed over the full set when it is complete
    done = {key: [{k: v for k, v in p.items() if k != "ig_z"} for p in (saved or {}).get(key, [])]
            for key in wanted}
    section("2) information gain", pairs=f"{len(done['pairs'])} saved, {ig.num_ig_pairs} wanted "
                                         f"({ig.ig_estimator})",
            validation_pairs=f"{len(done['validation'])} saved, {ig.num_validation_pairs} wanted (exact)",
            step=f"{ig.ig_optimizer}, lr {ig.ig_learning_rate}", objective_set=f"{len(sets.objective)} contexts")
    incomplete = any(len(done[k]) < wanted[k] for k in wanted) or not (saved or {}).get("complete")
    ppl_before = perplexity(model, sets.objective, ig.ig_eval_batch_size, device) if incomplete else \
        saved["ppl_before"]
    if saved is not None and not math.isclose(saved["ppl_before"], ppl_before, rel_tol=1e-9):
        raise IGFError(f"{path}: pretrained objective perplexity is {ppl_before}, saved {saved['ppl_before']}; "
                       "the model changed. Use --overwrite_output_dir")
    print(f"  pretrained objective-set perplexity {ppl_before:.4f}", flush=True)

    def record(complete=False):
        out = {"fingerprint": fingerprint, "ppl_before": ppl_before, "estimator": ig.ig_estimator,
               "complete": complete, **done}
        if complete:
            z, mean, std = zscore([p["ig"] for p in done["pairs"]])
            out["pairs"] = [{**p, "ig_z": zi} for p, zi in zip(done["pairs"], z)]
            out["stats"] = {**ig_statistics(done["pairs"], done["validation"]), "ig_std": std}
        return out

    estimate = partial(make_estimator, model=model, optimizer_name=ig.ig_optimizer, lr=ig.ig_learning_rate,
                       objective=sets.objective, ppl_before=ppl_before, batch_size=ig.ig_eval_batch_size,
                       device=device)
    write = artifacts.write_json if launch.is_main else (lambda *_: None)  # every process holds the same pairs
    checkpoint = dict(on_checkpoint=lambda _: write(path, record()), save_every=ig.ig_save_every, launch=launch)
    if len(done["pairs"]) < ig.num_ig_pairs:
        collect_ig_pairs(estimate(ig.ig_estimator), sets.train, indices["pairs"], done["pairs"], **checkpoint)
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
    write(path, result)
    s = result["stats"]
    print(f"  IG over {s['n']} pairs ({ig.ig_estimator}): mean {s['ig_mean']:.4g}, std {s['ig_std']:.4g}, range "
          f"[{s['ig_min']:.4g}, {s['ig_max']:.4g}], positive {s['fraction_positive']:.0%}", flush=True)
    if s["n_validation"]:
        print(f"  on {s['n_validation']} exact validation pairs: {ig.ig_estimator} estimate vs exact "
              f"{_corr(s['estimator_vs_exact'])}; the context's own pretrained loss vs exact "
              f"{_corr(s['context_loss_vs_exact'])}", flush=True)
    return result


def _corr(c):
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return f"Pearson {fmt(c['pearson'])}, Spearman {fmt(c['spearman'])}"


def load_ig_pairs(cfg, sets, ids):
    """The saved IG pairs for a later stage: refused unless made by this configuration (model, data, flags)."""
    path = os.path.join(cfg.run.output_dir, artifacts.IG_PAIRS)
    if not os.path.exists(path):
        raise IGFError(f"{path} not found: run the ig_pairs stage first")
    saved = artifacts.read_json(path)
    artifacts.check_fingerprint(path, saved, ig_fingerprint(cfg, sets, ids))
    n, n_val = len(saved.get("pairs", [])), len(saved.get("validation", []))
    if not saved.get("complete") or n != cfg.ig.num_ig_pairs or n_val != cfg.ig.num_validation_pairs:
        raise IGFError(f"{path} is incomplete or holds {n} pairs and {n_val} validation pairs, not --num_ig_pairs "
                       f"{cfg.ig.num_ig_pairs} and --num_validation_pairs {cfg.ig.num_validation_pairs}: rerun "
                       "with the ig_pairs stage")
    return saved


# ----------------------------------------------------------------------------- 3) secondary learner

def run_learner(cfg: Config, model, sets, pairs, ids, train_it, write=True):
    """Train (or reuse) the secondary learner on the z-scored IG pairs; ``write=False`` only loads it."""
    ln, out = cfg.learner, cfg.run.output_dir
    path = os.path.join(out, artifacts.LEARNER)
    fingerprint = {**ids, "pairs": sha([[p["tokens"], p["ig"]] for p in pairs["pairs"] + pairs.get("validation", [])]),
                   "learner": vars(ln), "seed": cfg.run.seed}
    arch = dict(channels=ln.learner_channels, kernel_size=ln.learner_kernel_size, hidden=ln.learner_hidden,
                dropout=ln.learner_dropout, pooling=ln.learner_pooling)
    embeddings = model.get_input_embeddings().weight
    # rebuilt from the data on every load (never saved): counts of the pool's and the objective set's tokens
    features = token_feature_table(sets.train, sets.objective, embeddings.shape[0]) \
        if ln.learner_token_features else None
    torch.manual_seed(cfg.run.seed + SEED_OFFSETS["learner"])  # weight init and dropout
    learner = SecondaryLearner(embeddings, token_features=features, **arch)
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
        try:
            missing, unexpected = learner.load_state_dict(saved["state"], strict=False)
            if set(missing) != learner.frozen_keys() or unexpected:  # only the frozen copies are not saved
                raise RuntimeError(f"missing {sorted(set(missing) - learner.frozen_keys())}, unexpected {unexpected}")
        except (RuntimeError, KeyError) as e:  # shapes or names of another architecture or model
            raise IGFError(f"{path} does not fit this secondary learner ({str(e).splitlines()[0][:200]}); use "
                           "--overwrite_output_dir") from None
        print(f"\n=== 3) secondary learner ===\n  reusing {path}", flush=True)
        if write:
            artifacts.write_json(os.path.join(out, artifacts.LEARNER_METRICS), saved["metrics"])
        return learner, saved["metrics"]
    tokens = torch.tensor([p["tokens"] for p in pairs["pairs"]])  # (N, T)
    z = torch.tensor([p["ig_z"] for p in pairs["pairs"]], dtype=torch.float32)  # (N,)
    section("3) secondary learner", pairs=len(z), trainable_parameters=sum(
        p.numel() for p in learner.parameters() if p.requires_grad), epochs=ln.learner_epochs)
    g = torch.Generator().manual_seed(cfg.run.seed + SEED_OFFSETS["learner"])
    metrics = train_learner(learner, tokens, z, ln.learner_val_fraction, ln.learner_epochs,
                            ln.learner_learning_rate, ln.learner_batch_size, g, weight_decay=ln.learner_weight_decay)
    metrics.update(exact_validation_metrics(learner, pairs))
    artifacts.write_json(os.path.join(out, artifacts.LEARNER_METRICS), metrics)
    artifacts.write_torch(path, {"fingerprint": fingerprint, "state": learner.trainable_state(), "arch": arch,
                                 "metrics": metrics})
    r = {k: "n/a" if v is None else f"{v:.3f}" for k, v in metrics.items() if k.endswith(("pearson", "spearman"))}
    print(f"  held-out labels: Pearson {r['val_pearson']}, Spearman {r['val_spearman']} (n={metrics['n_val']}, "
          f"best epoch {metrics['best_epoch']}); training labels: Pearson {r['train_pearson']}", flush=True)
    if metrics.get("n_exact"):
        print(f"  held-out EXACT IG (n={metrics['n_exact']}): learner Pearson {r['exact_pearson']}, Spearman "
              f"{r['exact_spearman']}; the context's own pretrained loss alone: Spearman "
              f"{r['context_loss_spearman']}", flush=True)
    return learner, metrics


# ----------------------------------------------------------------------------- 4) fine-tuning

def run_path(cfg, method, run):
    return os.path.join(cfg.run.output_dir, artifacts.RUNS, f"{method}_run{run:03d}.json")


def run_finetune(cfg: Config, model, sets, ids, learner, learner_fp, pairs, device, launch):
    ft = cfg.finetune
    common = {**ids, "train": sha(sets.train), "test": sha(sets.test), "seed": cfg.run.seed,
              "optim": [ft.learning_rate, ft.weight_decay, ft.warmup_steps, ft.batch_size, ft.max_steps,
                        ft.eval_every, ft.eval_batch_size, ft.torch_dtype, ft.standardize_scores, ft.mixed_precision]}
    section("4) fine-tuning", methods=" ".join(ft.methods), runs_per_method=ft.num_runs,
            batches=f"{ft.max_steps} x {ft.batch_size} contexts", test_set=f"{len(sets.test)} contexts")
    inputs, about = selection_inputs(ft, cfg.ig, sets.train, learner, pairs, objective_id=sha(sets.objective))
    # run-major order, so an interrupted invocation leaves every method with about as many finished runs
    todo = []
    for run, method in [(r, m) for r in range(ft.num_runs) for m in ft.methods]:
        # what the run depends on: the configuration every method shares, and what only its rule uses
        path = run_path(cfg, method, run)
        fingerprint = {**common, "method": method, "selection": selection_fingerprint(ft, method, learner_fp, about)}
        if os.path.exists(path):
            artifacts.check_fingerprint(path, artifacts.read_json(path), fingerprint)
        else:
            todo.append((run, method, path, fingerprint))
    todo = launch.deal(todo)  # this process's runs; each writes its own run files
    scored_by_lm = {m for _, m, _, _ in todo} & {"ppl", "oracle"}
    if scored_by_lm:  # only for runs still to do: scoring the reference sample costs LM passes
        inputs.scorers = make_lm_scorers(scored_by_lm, about, model, sets.train, pairs, cfg.ig, sets.objective,
                                         cfg.ig.ig_eval_batch_size, device)
    # 4a) every pending run's batches, chosen at the pretrained float32 weights before any training
    plans = {}
    for run, method, _, _ in tqdm(todo, desc="selecting batches", disable=not todo):
        seed = cfg.run.seed + SEED_OFFSETS["finetune"] + run
        stream = candidate_stream(len(sets.train), torch.Generator().manual_seed(seed))  # shared by all methods
        plans[run, method] = select_batches(make_rule(method, inputs, seed), stream, ft.batch_size, ft.max_steps)
    del inputs  # the LM scorers hold a weight snapshot and a gradient: free them before training
    # 4b) train on the plans
    model.to(getattr(torch, ft.torch_dtype))
    snapshot, ppl_start = WeightSnapshot(model), None
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=ft.mixed_precision == "bf16")
    with tqdm(total=len(todo) * ft.max_steps, desc="fine-tuning", disable=not todo) as progress:
        for run, method, path, fingerprint in todo:
            if ppl_start is None:
                ppl_start = perplexity(model, sets.test, ft.eval_batch_size, device)
                tqdm.write(f"pretrained test perplexity {ppl_start:.3f}")
            snapshot.restore()
            record = finetune_run(model, sets.train, sets.test, plans[run, method], method=method, run=run,
                                  seed=cfg.run.seed + SEED_OFFSETS["finetune"] + run, ppl_start=ppl_start, cfg=ft,
                                  device=device, autocast=autocast, progress=progress)
            artifacts.write_json(path, {**record, "fingerprint": fingerprint})
    snapshot.restore()


# ----------------------------------------------------------------------------- 5) statistics and figure

def load_runs(cfg):
    """Every saved run of each method (at least --num_runs of them), all made with one shared configuration."""
    records, missing = {}, []
    for method in cfg.finetune.methods:
        missing += [os.path.basename(run_path(cfg, method, r)) for r in range(cfg.finetune.num_runs)
                    if not os.path.exists(run_path(cfg, method, r))]
        paths = sorted(glob.glob(os.path.join(cfg.run.output_dir, artifacts.RUNS, f"{method}_run[0-9][0-9][0-9].json")))
        records[method] = [artifacts.read_json(p) for p in paths]
    if missing:
        raise IGFError(f"{len(missing)} fine-tuning runs are missing from {cfg.run.output_dir} (e.g. {missing[0]}); "
                       "run the finetune stage")
    shared = {}  # what every method's runs must have in common: model, data, optimizer, steps, seed, device
    for method, recs in records.items():
        for rec in recs:
            common = {k: v for k, v in (rec.get("fingerprint") or {}).items() if k not in ("method", "selection")}
            if shared and common != shared:
                raise IGFError(f"saved runs in {cfg.run.output_dir}/{artifacts.RUNS} were made with different "
                               f"configurations (e.g. {method} run {rec.get('run')}); keep one configuration per "
                               "--output_dir")
            shared = common
    return records


def run_statistics_and_plot(cfg):
    records = load_runs(cfg)
    results = compare_methods(records)
    out = cfg.run.output_dir
    learner_path = os.path.join(out, artifacts.LEARNER_METRICS)
    results["learner"] = artifacts.read_json(learner_path) if os.path.exists(learner_path) else None
    artifacts.write_json(os.path.join(out, artifacts.RESULTS), results)
    table = markdown_table(results, results["learner"])
    artifacts.write_text(os.path.join(out, artifacts.RESULTS_TABLE), table)
    first = next(iter(records.values()))[0]  # the runs, not this invocation's flags, say how they were made
    counts = sorted({len(r) for r in records.values()})
    runs_text = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    fig = plot_results(results, records, title=f"batch {first['batch_size']} x {first['context_len']} tokens, "
                                               f"{first['steps'][-1]} batches, "
                                               f"{runs_text} runs per method")
    artifacts.write_figure(os.path.join(out, artifacts.FIGURE), fig)
    section("5) statistics")
    print(table, flush=True)
    print(f"  table: {os.path.join(out, artifacts.RESULTS_TABLE)}; figure: {os.path.join(out, artifacts.FIGURE)}",
          flush=True)
    return results


# ----------------------------------------------------------------------------- the driver

def run(cfg: Config, launch=None):
    """Every stage of --stages, under one lock on --output_dir. ``launch`` (igf/distributed.py) says which
    process this is; without a launcher it is the only one."""
    launch = launch or Launch()
    out, lock, error = cfg.run.output_dir, None, None
    if launch.is_main:
        try:
            artifacts.prepare_output_dir(out, overwrite=False)  # fail early if unwritable; delete nothing yet
            lock = OutputLock(out).acquire()  # one writer per output folder
        except IGFError as e:
            error = str(e)
    launch.agree(error)  # a refusal stops every process, not only the main one
    try:
        with launch.quiet_unless_main():
            return run_stages(cfg, launch)
    finally:
        if lock is not None:
            lock.release()


def run_stages(cfg: Config, launch):
    out, stages = cfg.run.output_dir, cfg.run.stages
    print("configuration:\n" + artifacts.dumps(cfg.to_dict()), flush=True)
    print(f"launch: {launch.describe()}", flush=True)
    timings, start = {}, time.perf_counter()
    if stages != ["plot"]:
        device = resolve_device(cfg.run.device, launch)
        # 1) objective set: sampled from held-out text, disjoint from the test set and the training pool
        model, sets, ids, data_summary = load_model_and_contexts(cfg, device)
        if cfg.run.overwrite_output_dir:  # only now that model and data loaded: bad input must not cost old results
            if "ig_pairs" not in stages:
                raise IGFError("--overwrite_output_dir deletes every artifact, so it needs all stages from ig_pairs "
                               f"on (got --stages {' '.join(stages)})")
            if launch.is_main:
                artifacts.prepare_output_dir(out, overwrite=True)
            launch.wait()
        timings["load"] = time.perf_counter() - start
        # the controls keep what IGF keeps, so they need the learner too
        filtered = [m for m in cfg.finetune.methods if m in IGF_METHODS + CONTROLS]
        needs_learner = bool(filtered) and bool({"learner", "finetune"} & set(stages))
        if not filtered and {"ig_pairs", "learner"} & set(stages):
            print("\nonly standard among --methods: IG pairs and the secondary learner are not needed", flush=True)
        learner = learner_fp = pairs = None
        if needs_learner or ("ig_pairs" in stages and filtered):
            # 2) information gain of single training contexts, measured on the objective set (labels sharded)
            t = time.perf_counter()
            pairs = (run_ig_pairs(cfg, model, sets, ids, device, launch) if "ig_pairs" in stages
                     else load_ig_pairs(cfg, sets, ids))
            timings["ig_pairs"] = time.perf_counter() - t
        if needs_learner:
            # 3) secondary learner: tokens -> predicted z-scored IG (trained and saved by the main process)
            t = time.perf_counter()
            if launch.is_main:
                learner, _ = run_learner(cfg, model, sets, pairs, ids, train_it="learner" in stages)
            launch.wait()
            if not launch.is_main:
                learner, _ = run_learner(cfg, model, sets, pairs, ids, train_it=False, write=False)
            learner_fp = sha(torch.cat([v.flatten() for v in learner.trainable_state().values()]))
            timings["learner"] = time.perf_counter() - t
        if "finetune" in stages:
            # 4) fine-tune: every method on the same seeds, optimizer and candidate streams (runs dealt out)
            t = time.perf_counter()
            run_finetune(cfg, model, sets, ids, learner, learner_fp, pairs, device, launch)
            launch.wait()
            timings["finetune"] = time.perf_counter() - t
    results = None
    if "plot" in stages and launch.is_main:
        # 5) statistics and figure, from the saved runs alone
        results = run_statistics_and_plot(cfg)
    timings["total"] = time.perf_counter() - start
    timings.update(launch.describe())
    # written only after every stage succeeded, so a refused or failed invocation leaves the directory as it was
    if launch.is_main:
        if stages != ["plot"]:  # a redraw leaves the configuration of the run that made the results
            artifacts.write_json(os.path.join(out, artifacts.CONFIG), {**cfg.to_dict(), "launch": launch.describe()})
            artifacts.write_json(os.path.join(out, artifacts.DATA), data_summary)
        artifacts.write_json(os.path.join(out, artifacts.TIMINGS), timings)
    print("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items() if isinstance(v, float)),
          flush=True)
    return results


def main(argv=None):
    try:
        run(parse_args(argv))
        return 0
    except IGFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is saved in the output directory; rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
