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

import torch
from tqdm.auto import tqdm

from igf import artifacts, assets
from igf.config import SEED_OFFSETS, Config, parse_args
from igf.data import build_context_sets, load_raw_splits, tokenize_splits
from igf.errors import IGFError
from igf.finetune import acceptance_rate, finetune_run, standardize_scores
from igf.information_gain import WeightSnapshot, collect_ig_pairs, make_ig_optimizer, perplexity, zscore
from igf.plot import plot_results
from igf.secondary_learner import SecondaryLearner, predict, train_learner
from igf.statistics import compare_methods
from igf.thresholds import threshold_schedule

IGF_METHODS = ("igf_constant", "igf_shifting")


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


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
            "seed": cfg.run.seed}


def run_ig_pairs(cfg: Config, model, sets, ids, device):
    """Collect (or resume, or reuse) the IG pairs; returns the saved record with z-scores and statistics."""
    ig, path = cfg.ig, os.path.join(cfg.run.output_dir, artifacts.IG_PAIRS)
    fingerprint = ig_fingerprint(cfg, sets, ids)
    saved = artifacts.read_json(path) if os.path.exists(path) else None
    if saved is not None:
        artifacts.check_fingerprint(path, saved, fingerprint)
        if len(saved.get("pairs", [])) > ig.num_ig_pairs:  # keeping a prefix would overwrite (lose) the rest
            raise IGFError(f"{path} holds {len(saved['pairs'])} IG pairs, more than --num_ig_pairs "
                           f"{ig.num_ig_pairs}; pass --num_ig_pairs {len(saved['pairs'])} to reuse them, or "
                           "--overwrite_output_dir / another --output_dir to start over")
    if ig.num_ig_pairs > len(sets.train):
        raise IGFError(f"--num_ig_pairs {ig.num_ig_pairs} exceeds the {len(sets.train)} training contexts")
    g = torch.Generator().manual_seed(cfg.run.seed + SEED_OFFSETS["ig_pairs"])
    indices = torch.randperm(len(sets.train), generator=g)[: ig.num_ig_pairs]  # a prefix-stable choice
    # raw pairs only: z-scores are recomputed over the full set when it is complete
    pairs = [{k: v for k, v in p.items() if k != "ig_z"} for p in (saved or {}).get("pairs", [])]
    section("2) information gain", pairs=f"{len(pairs)} saved, {ig.num_ig_pairs} wanted",
            step=f"{ig.ig_optimizer}, lr {ig.ig_learning_rate}", objective_set=f"{len(sets.objective)} contexts")
    ppl_before = perplexity(model, sets.objective, ig.ig_eval_batch_size, device) if (
        len(pairs) < ig.num_ig_pairs) else saved["ppl_before"]
    if saved is not None and not math.isclose(saved["ppl_before"], ppl_before, rel_tol=1e-9):
        raise IGFError(f"{path}: pretrained objective perplexity is {ppl_before}, saved {saved['ppl_before']}; "
                       "the model changed. Use --overwrite_output_dir")
    print(f"  pretrained objective-set perplexity {ppl_before:.4f}", flush=True)

    def record(pairs, complete=False):
        out = {"fingerprint": fingerprint, "ppl_before": ppl_before, "complete": complete, "pairs": pairs}
        if complete:
            z, mean, std = zscore([p["ig"] for p in pairs])
            out["pairs"] = [{**p, "ig_z": zi} for p, zi in zip(pairs, z)]
            out["stats"] = {"n": len(pairs), "ig_mean": mean, "ig_std": std, "ig_min": min(p["ig"] for p in pairs),
                            "ig_max": max(p["ig"] for p in pairs),
                            "fraction_positive": sum(p["ig"] > 0 for p in pairs) / len(pairs)}
        return out

    if len(pairs) < ig.num_ig_pairs:
        optimizer = make_ig_optimizer(ig.ig_optimizer, model.parameters(), ig.ig_learning_rate)
        collect_ig_pairs(model, optimizer, sets.train, indices, sets.objective, ppl_before, ig.ig_eval_batch_size,
                         device, pairs, on_checkpoint=lambda ps: artifacts.write_json(path, record(ps)),
                         save_every=ig.ig_save_every)
    result = record(pairs, complete=True)
    artifacts.write_json(path, result)
    s = result["stats"]
    print(f"  IG over {s['n']} pairs: mean {s['ig_mean']:.4g}, std {s['ig_std']:.4g}, range [{s['ig_min']:.4g}, "
          f"{s['ig_max']:.4g}], positive {s['fraction_positive']:.0%}", flush=True)
    return result


def load_ig_pairs(cfg, sets, ids):
    """The saved IG pairs for a later stage: refused unless made by this configuration (model, data, flags)."""
    path = os.path.join(cfg.run.output_dir, artifacts.IG_PAIRS)
    if not os.path.exists(path):
        raise IGFError(f"{path} not found: run the ig_pairs stage first")
    saved = artifacts.read_json(path)
    artifacts.check_fingerprint(path, saved, ig_fingerprint(cfg, sets, ids))
    if not saved.get("complete") or len(saved.get("pairs", [])) != cfg.ig.num_ig_pairs:
        raise IGFError(f"{path} is incomplete or holds {len(saved.get('pairs', []))} pairs, not --num_ig_pairs "
                       f"{cfg.ig.num_ig_pairs}: rerun with the ig_pairs stage")
    return saved


# ----------------------------------------------------------------------------- 3) secondary learner

def run_learner(cfg: Config, model, pairs, ids, train_it):
    """Train (or reuse) the secondary learner on the z-scored IG pairs."""
    ln, out = cfg.learner, cfg.run.output_dir
    path = os.path.join(out, artifacts.LEARNER)
    fingerprint = {**ids, "pairs": sha([[p["tokens"], p["ig"]] for p in pairs["pairs"]]),
                   "learner": vars(ln), "seed": cfg.run.seed}
    arch = dict(channels=ln.learner_channels, kernel_size=ln.learner_kernel_size, hidden=ln.learner_hidden,
                dropout=ln.learner_dropout)
    torch.manual_seed(cfg.run.seed + SEED_OFFSETS["learner"])  # weight init and dropout
    learner = SecondaryLearner(model.get_input_embeddings().weight, **arch)
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
            if set(missing) != {"embed.weight"} or unexpected:  # only the frozen embedding copy is not saved
                raise RuntimeError(f"missing {sorted(set(missing) - {'embed.weight'})}, unexpected {unexpected}")
        except (RuntimeError, KeyError) as e:  # shapes or names of another architecture or model
            raise IGFError(f"{path} does not fit this secondary learner ({str(e).splitlines()[0][:200]}); use "
                           "--overwrite_output_dir") from None
        print(f"\n=== 3) secondary learner ===\n  reusing {path}", flush=True)
        artifacts.write_json(os.path.join(out, artifacts.LEARNER_METRICS), saved["metrics"])
        return learner, saved["metrics"]
    tokens = torch.tensor([p["tokens"] for p in pairs["pairs"]])  # (N, T)
    z = torch.tensor([p["ig_z"] for p in pairs["pairs"]], dtype=torch.float32)  # (N,)
    section("3) secondary learner", pairs=len(z), trainable_parameters=sum(
        p.numel() for p in learner.parameters() if p.requires_grad), epochs=ln.learner_epochs)
    g = torch.Generator().manual_seed(cfg.run.seed + SEED_OFFSETS["learner"])
    metrics = train_learner(learner, tokens, z, ln.learner_val_fraction, ln.learner_epochs,
                            ln.learner_learning_rate, ln.learner_batch_size, g)
    artifacts.write_json(os.path.join(out, artifacts.LEARNER_METRICS), metrics)
    artifacts.write_torch(path, {"fingerprint": fingerprint, "state": learner.trainable_state(), "arch": arch,
                                 "metrics": metrics})
    r = {k: "n/a" if v is None else f"{v:.3f}" for k, v in metrics.items() if k.endswith(("pearson", "spearman"))}
    print(f"  held-out pairs: Pearson {r['val_pearson']}, Spearman {r['val_spearman']} (n={metrics['n_val']}, "
          f"best epoch {metrics['best_epoch']}); training pairs: Pearson {r['train_pearson']}", flush=True)
    return learner, metrics


# ----------------------------------------------------------------------------- 4) fine-tuning

def run_path(cfg, method, run):
    return os.path.join(cfg.run.output_dir, artifacts.RUNS, f"{method}_run{run:03d}.json")


def thresholds_of(cfg, method):
    ft = cfg.finetune
    return threshold_schedule(method, ft.constant_threshold, ft.shift_schedule, ft.shift_strict, ft.shift_loose,
                              ft.shift_batches)


def check_acceptance(cfg, scores, method):
    """Refuse, before any run, a threshold that would keep (almost) nothing of the pool."""
    fn = thresholds_of(cfg, method)
    rates = [acceptance_rate(scores, fn(b)) for b in range(cfg.finetune.max_steps)]
    worst = min(range(len(rates)), key=rates.__getitem__)
    print(f"  {method}: keeps {rates[0]:.1%} of the pool at batch 1, {rates[-1]:.1%} at batch {len(rates)}",
          flush=True)
    if rates[worst] < cfg.finetune.min_acceptance or rates[worst] == 0:  # 0 would draw candidates forever
        raise IGFError(f"{method} threshold {fn(worst):.3g} at batch {worst + 1} keeps {rates[worst]:.2%} of the "
                       f"training pool (minimum --min_acceptance {cfg.finetune.min_acceptance}); lower it")


def run_finetune(cfg: Config, model, sets, ids, learner, learner_fp, device):
    ft = cfg.finetune
    dtype = getattr(torch, ft.torch_dtype)
    model.to(dtype)
    common = {**ids, "train": sha(sets.train), "test": sha(sets.test), "seed": cfg.run.seed,
              "optim": [ft.learning_rate, ft.weight_decay, ft.warmup_steps, ft.batch_size, ft.max_steps,
                        ft.eval_every, ft.eval_batch_size, ft.torch_dtype, ft.standardize_scores]}
    scores = predict(learner, sets.train) if learner is not None else None  # (N_pool,) predicted z-scored IG
    if scores is not None and ft.standardize_scores:
        scores = standardize_scores(scores)
    section("4) fine-tuning", methods=" ".join(ft.methods), runs_per_method=ft.num_runs,
            batches=f"{ft.max_steps} x {ft.batch_size} contexts", test_set=f"{len(sets.test)} contexts")
    for method in ft.methods:
        if method in IGF_METHODS:
            check_acceptance(cfg, scores, method)
    snapshot, ppl_start = WeightSnapshot(model), None
    # run-major order, so an interrupted invocation leaves every method with about as many finished runs
    todo = [(r, m) for r in range(ft.num_runs) for m in ft.methods]
    # a context manager: the bar is closed even on an error, so the error line starts a line of its own
    with tqdm(total=len(todo) * ft.max_steps, desc="fine-tuning") as progress:
        for run, method in todo:
            path = run_path(cfg, method, run)
            fingerprint = {**common, "method": method}
            if method in IGF_METHODS:
                fingerprint.update(learner=learner_fp, thresholds=[thresholds_of(cfg, method)(b)
                                                                   for b in range(ft.max_steps)])
            if os.path.exists(path):
                saved = artifacts.read_json(path)
                artifacts.check_fingerprint(path, saved, fingerprint)
                progress.update(ft.max_steps)
                continue
            if ppl_start is None:
                ppl_start = perplexity(model, sets.test, ft.eval_batch_size, device)
                tqdm.write(f"pretrained test perplexity {ppl_start:.3f}")
            snapshot.restore()
            record = finetune_run(model, sets.train, sets.test, method=method, run=run,
                                  seed=cfg.run.seed + SEED_OFFSETS["finetune"] + run, ppl_start=ppl_start,
                                  scores=scores if method in IGF_METHODS else None,
                                  threshold_fn=thresholds_of(cfg, method) if method in IGF_METHODS else None,
                                  cfg=ft, device=device, progress=progress)
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
            common = {k: v for k, v in (rec.get("fingerprint") or {}).items()
                      if k not in ("method", "learner", "thresholds")}
            if shared and common != shared:
                raise IGFError(f"saved runs in {cfg.run.output_dir}/{artifacts.RUNS} were made with different "
                               f"configurations (e.g. {method} run {rec.get('run')}); keep one configuration per "
                               "--output_dir")
            shared = common
    return records


def _p(p):
    return "n/a (fewer than 2 runs)" if p is None else f"{p:.3g}"


def run_statistics_and_plot(cfg):
    records = load_runs(cfg)
    results = compare_methods(records)
    out = cfg.run.output_dir
    artifacts.write_json(os.path.join(out, artifacts.RESULTS), results)
    first = next(iter(records.values()))[0]  # the runs, not this invocation's flags, say how they were made
    counts = sorted({len(r) for r in records.values()})
    runs_text = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    fig = plot_results(results, records, title=f"batch {first['batch_size']} x {first['context_len']} tokens, "
                                               f"{first['steps'][-1]} batches, "
                                               f"{runs_text} runs per method")
    artifacts.write_figure(os.path.join(out, artifacts.FIGURE), fig)
    section("5) statistics", **{m: f"final test PPL median {s['final_test_ppl']['median']:.3f}, mean "
                                   f"{s['final_test_ppl']['mean']:.3f} ± {s['final_test_ppl']['se'] or 0:.3f} SE; "
                                   f"area under curve {s['auc_test_ppl']['mean']:.3f}; "
                                   f"{s['candidates_per_kept_context']:.2f} candidates per kept context"
                                for m, s in results["methods"].items()},
            **{k: f"Welch p = {_p(v['final']['p'])} (final), {_p(v['auc']['p'])} (area under curve)"
               for k, v in results["tests"].items()})
    print(f"  figure: {os.path.join(out, artifacts.FIGURE)}", flush=True)
    return results


# ----------------------------------------------------------------------------- the driver

def run(cfg: Config):
    out, stages = cfg.run.output_dir, cfg.run.stages
    artifacts.prepare_output_dir(out, overwrite=False)  # fail early if unwritable; delete nothing yet
    print("configuration:\n" + artifacts.dumps(cfg.to_dict()), flush=True)
    timings, start = {}, time.perf_counter()
    if stages != ["plot"]:
        device = resolve_device(cfg.run.device)
        # 1) objective set: sampled from held-out text, disjoint from the test set and the training pool
        model, sets, ids, data_summary = load_model_and_contexts(cfg, device)
        if cfg.run.overwrite_output_dir:  # only now that model and data loaded: bad input must not cost old results
            if "ig_pairs" not in stages:
                raise IGFError("--overwrite_output_dir deletes every artifact, so it needs all stages from ig_pairs "
                               f"on (got --stages {' '.join(stages)})")
            artifacts.prepare_output_dir(out, overwrite=True)
        timings["load"] = time.perf_counter() - start
        igf_methods = [m for m in cfg.finetune.methods if m in IGF_METHODS]
        needs_learner = bool(igf_methods) and bool({"learner", "finetune"} & set(stages))
        if not igf_methods and {"ig_pairs", "learner"} & set(stages):
            print("\nno IGF method among --methods: IG pairs and the secondary learner are not needed", flush=True)
        learner = learner_fp = None
        if needs_learner or ("ig_pairs" in stages and igf_methods):
            # 2) information gain of single training contexts, measured on the objective set
            t = time.perf_counter()
            pairs = (run_ig_pairs(cfg, model, sets, ids, device) if "ig_pairs" in stages
                     else load_ig_pairs(cfg, sets, ids))
            timings["ig_pairs"] = time.perf_counter() - t
        if needs_learner:
            # 3) secondary learner: tokens -> predicted z-scored IG
            t = time.perf_counter()
            learner, metrics = run_learner(cfg, model, pairs, ids, train_it="learner" in stages)
            learner_fp = sha(torch.cat([v.flatten() for v in learner.trainable_state().values()]))
            timings["learner"] = time.perf_counter() - t
        if "finetune" in stages:
            # 4) fine-tune: standard and IGF, same seeds, optimizer and batches
            t = time.perf_counter()
            run_finetune(cfg, model, sets, ids, learner, learner_fp, device)
            timings["finetune"] = time.perf_counter() - t
    results = None
    if "plot" in stages:
        # 5) statistics and figure, from the saved runs alone
        results = run_statistics_and_plot(cfg)
    timings["total"] = time.perf_counter() - start
    # written only after every stage succeeded, so a refused or failed invocation leaves the directory as it was
    if stages != ["plot"]:  # a redraw leaves the configuration of the run that made the results
        artifacts.write_json(os.path.join(out, artifacts.CONFIG), cfg.to_dict())
        artifacts.write_json(os.path.join(out, artifacts.DATA), data_summary)
    artifacts.write_json(os.path.join(out, artifacts.TIMINGS), timings)
    print("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()), flush=True)
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
