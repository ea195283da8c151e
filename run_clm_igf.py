#!/usr/bin/env python
"""Information Gain Filtration (Antonello, Beckage, Turek, Huth, ACL 2021), end to end.

    python run_clm_igf.py                      # offline default: SmolLM2-135M on public-domain books, CPU
    python run_clm_igf.py --preset paper --model_name_or_path openai-community/gpt2 \\
        --dataset_name wikitext --dataset_config_name wikitext-103-raw-v1      # paper scale, needs the hub

Stages, as in the paper: 1) objective set, 2) information-gain pairs, 3) secondary learner (steps 1-3 once per
pipeline, --num_pipelines), 4) standard, IGF and control fine-tuning over seeded runs, 5) statistics, figures and
the selection report. Every artifact goes to --output_dir (see igf/artifacts.py) and is reused when the same
command is run again, so an interrupted run resumes where it stopped. The trained learner then filters new text
(python -m igf.filter) and --save_models keeps the fine-tuned models.
"""
import os
import sys
import time
from dataclasses import replace
from functools import partial

import torch
from tqdm.auto import tqdm

from igf import artifacts, assets, saved_models
from igf.allocator import use_allocator
from igf.artifacts import files_sha, sha, tokenizer_sha, weights_sha
from igf.config import Config, parse_args, run_seed, stage_seed
from igf.data import build_context_sets, load_raw_splits, tokenize_splits
from igf.distributed import Launch, OutputLock, resolve_device
from igf.errors import IGFError
from igf.finetune import cpu_bf16_warning, finetune_run
from igf.information_gain import WeightSnapshot, context_losses, perplexity
from igf.pipelines import (
    check_learners,
    load_ig_pairs,
    make_pipelines,
    reference_rows,
    run_ig_pairs,
    run_learner,
    section,
)
from igf.plot import plot_results, plot_selection
from igf.selection import (
    CONDITIONAL,
    ONLINE,
    attach_model,
    candidate_stream,
    make_rule,
    make_selection,
    needs_labels,
    needs_learner,
    require_sources,
    select_batches,
    selection_fingerprint,
    selection_inputs,
)
from igf.selection_report import contexts_summary, kept_facts, loss_sample, selection_markdown, selection_report
from igf.statistics import compare_all, cost_table, markdown_tables

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
                                  text_column=d.text_column, source_column=d.source_column)))
    model, tokenizer = assets.load_pretrained(path, torch.float32)  # float32: IG needs it (igf/information_gain.py)
    model.to(device)
    corpus = tokenize_splits(raw, tokenizer)
    described = {s: _describe_files(files[s]) if files else f"split {s!r} of {d.dataset_name}" for s in files or
                 ("train", "validation", "test")}
    sets = build_context_sets(corpus, d.context_len, d.size_test_set, stage_seed(cfg.run.seed, "test_set"),
                              described, size_final_test_set=d.size_final_test_set)
    require_sources(cfg.finetune.methods, sets.source_names, sets.sources and sets.sources["train"])
    data_id = {s: files_sha(f) for s, f in files.items()} if files else [d.dataset_name, d.dataset_config_name,
                                                                         d.source_column]
    vocab, width = model.get_input_embeddings().weight.shape  # named in a refusal, not only the config's hash
    architecture = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}  # not where it lies
    model_id = {"model": d.model_name_or_path, "config": sha(architecture), "weights": weights_sha(model),
                "vocab": vocab, "embedding_dim": width}
    n_params = sum(p.numel() for p in model.parameters())
    section("data and model", model=f"{d.model_name_or_path} ({n_params:,} parameters)", device=str(device),
            **{f"{s} tokens": f"{len(corpus.ids[s]):,} ({described[s]})" for s in corpus.ids},
            **{f"{k} contexts": f"{v[0]:,} x {v[1]} tokens" for k, v in sets.summary().items()},
            sources=f"{len(sets.source_names)}" if sets.sources is not None else "unknown")
    summary = {"sources": described, "tokens": {s: len(corpus.ids[s]) for s in corpus.ids},
               "contexts": sets.summary(), "model_parameters": n_params}
    ids = {"model": model_id, "tokenizer": tokenizer_sha(tokenizer), "data": data_id, "device": device.type}
    return model, tokenizer, sets, ids, summary


def kept_losses(model, pool, plans, samples, ft, device):
    """{pool row: pretrained loss} of the ``samples`` positions of each plan's kept contexts, in one LM pass (the
    selection report's pretrained loss of what a method keeps; the model must hold the pretrained weights)."""
    rows = sorted({plan.batches[i // ft.batch_size][i % ft.batch_size] for key, plan in plans.items()
                   for i in samples[key]})
    return dict(zip(rows, context_losses(model, pool[rows], ft.eval_batch_size, device).tolist())) if rows else {}


def _describe_files(files):
    return files[0][0] if len(files) == 1 else f"{len(files)} files in {os.path.commonpath([f for f, _ in files])}"


# ----------------------------------------------------------------------------- 4) fine-tuning

def finetune_fingerprint(cfg: Config, sets, ids):
    """What every fine-tuning run's record depends on, whatever its method: model, data, seed, optimizer and
    schedule (a run's fingerprint adds its method, its rule's settings and its candidate stream)."""
    ft = cfg.finetune
    common = {**ids, "train": sha(sets.train), "test": sha(sets.test), "seed": cfg.run.seed,
              "optim": [ft.learning_rate, ft.weight_decay, ft.warmup_steps, ft.batch_size, ft.max_steps,
                        ft.eval_every, ft.eval_batch_size, ft.torch_dtype, ft.standardize_scores, ft.mixed_precision,
                        ft.report_loss_sample]}
    if sets.final_test is not None:  # only then: runs measured without it stay valid
        common["final_test"] = sha(sets.final_test)
    return common


def run_finetune(cfg: Config, model, tokenizer, sets, pipelines, ids, device, launch):
    ft, out = cfg.finetune, cfg.run.output_dir
    common = finetune_fingerprint(cfg, sets, ids)
    section("4) fine-tuning", methods=" ".join(ft.methods), runs_per_method=ft.num_runs,
            pipelines=cfg.run.num_pipelines, batches=f"{ft.max_steps} x {ft.batch_size} contexts",
            test_set=f"{len(sets.test)} contexts" + (f" (and {len(sets.final_test)} after the last batch)"
                                                     if sets.final_test is not None else ""))
    pool_sources = sets.sources["train"] if sets.sources is not None else None
    inputs, about = {}, {}
    for pipe in pipelines:
        inputs[pipe.index], about[pipe.index] = selection_inputs(
            ft, cfg.ig, sets.train, pipe.learner, pipe.pairs, objective=pipe.objective,
            objective_id=sha(pipe.objective), scale=pipe.scale, sources=pool_sources,
            num_sources=len(sets.source_names), validation=sets.validation, validation_id=sha(sets.validation),
            learner_cfg=cfg.learner)
    # pipeline by pipeline: a pipeline's set-up (its LM scorers, conditional models and static plans: ~15 min per
    # pipeline and process for the study's LM-scored rules on 2 cores) is made once and its runs follow, so an
    # interrupted invocation loses at most one pipeline's set-up; within a pipeline run-major, so every method
    # has about as many finished runs. With --pipeline_streams shared, standard does not depend on the pipeline,
    # so it runs once per run index (with pipeline 0)
    shared = cfg.run.pipeline_streams == "shared"
    todo = []
    for pipe, run, method in [(p, r, m) for p in pipelines for r in range(ft.num_runs) for m in ft.methods]:
        if method == "standard" and shared and pipe.index > 0:
            continue
        path = artifacts.run_path(out, method, pipe.index, run)
        selection = selection_fingerprint(ft, method, pipe.learner_fp, about[pipe.index])
        # the run's candidate stream by its seed: a pipeline's runs under shared streams are not its own runs
        fingerprint = {**common, "method": method, "selection": selection, "stream": run_seed(cfg, pipe.index, run)}
        model_dir = saved_models.model_dir(out, method)
        if os.path.exists(path):
            artifacts.check_fingerprint(path, artifacts.read_json(path), fingerprint)
            # --save_models after the runs: run 0 is retrained (deterministic) and checked against its record
            if ft.save_models and run == 0 and pipe.index == 0 and not saved_models.is_saved(model_dir):
                todo.append((run, pipe, method, path, fingerprint))
        else:
            todo.append((run, pipe, method, path, fingerprint))
    runs_to_train = len(todo)  # over every process
    todo = launch.deal(todo)  # this process's runs; each writes its own run files
    # 4a) a pipeline's pending static runs get their batches at the pretrained float32 weights, before they train;
    #     what its LM-scored and online rules need (scorers, conditional models) is built then, and the static
    #     scorers are freed once their plans are made (each holds a weight snapshot and a gradient). In float32
    #     this happens when the pipeline's first run comes up (the weights restored first), so training starts
    #     after one pipeline's set-up, not five; in another --torch_dtype, for every pipeline before any training.
    plans, samples, losses, planned = {}, {}, {}, set()

    def plan_pipeline(pipe):
        mine = [(run, method) for run, p, method, _, _ in todo if p is pipe]
        needs_lm = {m for _, m in mine} & {"ppl", "oracle", *CONDITIONAL, *ONLINE}
        if needs_lm:  # only for runs still to do: scoring the reference sample costs LM passes
            attach_model(inputs[pipe.index], needs_lm, about[pipe.index], model, sets.train, pipe.pairs,
                         ig_cfg=cfg.ig, ft=ft, learner_cfg=cfg.learner, objective=pipe.objective,
                         validation=sets.validation, batch_size=cfg.ig.ig_eval_batch_size, device=device,
                         seed=stage_seed(cfg.run.seed, "finetune", pipe.index),
                         reference_rows=reference_rows(cfg, pipe, len(sets.train)))
        mine_static = {}
        for run, method in tqdm([rm for rm in mine if rm[1] not in ONLINE], desc=f"selecting batches (pipeline "
                                f"{pipe.index})", disable=not mine):
            seed = run_seed(cfg, pipe.index, run)
            stream = candidate_stream(len(sets.train), torch.Generator().manual_seed(seed))  # shared by all methods
            mine_static[run, pipe.index, method] = select_batches(make_rule(method, inputs[pipe.index], seed),
                                                                  stream, ft.batch_size, ft.max_steps)
        inputs[pipe.index].scorers = {}  # only rho scores with a conditional model while training: free the rest
        kept = {CONDITIONAL[m] for _, m in mine if m in ONLINE and m in CONDITIONAL}
        inputs[pipe.index].conditional = {k: v for k, v in inputs[pipe.index].conditional.items() if k in kept}
        # ... and the pretrained loss of a sample of each plan's kept contexts (the selection report), in one pass
        samples.update({key: loss_sample(ft.max_steps * ft.batch_size, ft.report_loss_sample) for key in mine_static})
        losses.update(kept_losses(model, sets.train, mine_static, samples, ft, device))
        plans.update(mine_static)
        planned.add(pipe.index)

    if ft.torch_dtype != "float32":
        for pipe in pipelines:
            plan_pipeline(pipe)
    # 4b) train: on the plans, or picking each batch with the model as it is (online rules)
    model.to(getattr(torch, ft.torch_dtype))
    snapshot, ppl_start = WeightSnapshot(model), None
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=ft.mixed_precision == "bf16")
    if todo and (warning := cpu_bf16_warning(device, ft.mixed_precision)):
        print(warning, flush=True)
    with tqdm(total=len(todo) * ft.max_steps, desc="fine-tuning", disable=not todo) as progress:
        for run, pipe, method, path, fingerprint in todo:
            if ppl_start is None:
                ppl_start = perplexity(model, sets.test, ft.eval_batch_size, device)
                tqdm.write(f"pretrained test perplexity {ppl_start:.3f}")
            snapshot.restore()
            if pipe.index not in planned:
                plan_pipeline(pipe)  # at the pretrained weights, just restored
            seed, key = run_seed(cfg, pipe.index, run), (run, pipe.index, method)
            if key in plans:
                selection = plans[key]
            else:  # an online rule holds the model: built now, at the pretrained weights, on the run's own stream
                stream = candidate_stream(len(sets.train), torch.Generator().manual_seed(seed))
                selection = make_selection(make_rule(method, inputs[pipe.index], seed), stream, ft.batch_size,
                                           ft.max_steps)
            record = finetune_run(model, sets.train, sets.test, selection, method=method, run=run, seed=seed,
                                  ppl_start=ppl_start, cfg=ft, device=device, autocast=autocast, progress=progress,
                                  final_test=sets.final_test)
            saving = ft.save_models and run == 0 and pipe.index == 0
            if key not in plans:  # the pretrained loss of the kept sample, now that the run has chosen them
                samples[key] = loss_sample(ft.max_steps * ft.batch_size, ft.report_loss_sample)
                final = WeightSnapshot(model) if saving else None  # the fine-tuned weights, to be saved below
                snapshot.restore()
                losses.update(kept_losses(model, sets.train, {key: selection.plan}, samples, ft, device))
                if final is not None:
                    final.restore()
            record.update(pipeline=None if method == "standard" and shared else pipe.index,
                          **kept_facts(selection.plan.batches, sets.train, pool_sources, losses, samples[key]))
            seconds = record.pop("seconds")
            record = {**record, "fingerprint": fingerprint}
            if os.path.exists(path):  # retrained only to save its model
                saved_models.check_rerun(path, artifacts.read_json(path), record)
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)  # a pipeline's runs/ folder
                os.makedirs(os.path.dirname(artifacts.seconds_path(path)), exist_ok=True)
                artifacts.write_json(artifacts.seconds_path(path), seconds)
                artifacts.write_json(path, record)  # last: a run counts as done when its record exists
            if saving:
                saved_models.save_model(saved_models.model_dir(out, method), model, tokenizer, record, cfg,
                                        pipelines[0].metrics)
    snapshot.restore()
    return runs_to_train


# ----------------------------------------------------------------------------- 5) statistics and figure

DESIGN = {"finetune": ("methods", "num_runs"), "run": ("num_pipelines", "pipeline_streams")}  # what the runs are


def saved_design(cfg):
    """``cfg`` with the design of the run saved in its output folder (its config.json: methods, runs, pipelines,
    candidate streams), so that redrawing (--plot_only) arranges the runs as they were made; ``cfg`` itself when
    the folder holds no configuration (the runs are then checked against the command line's design)."""
    path = os.path.join(cfg.run.output_dir, artifacts.CONFIG)
    if not artifacts.is_run_config(path):
        return cfg
    saved, changes, notes = artifacts.read_json(path), {}, []
    for section_name, keys in DESIGN.items():
        # a folder from before --pipeline_streams shared its standard runs across pipelines
        old = {"pipeline_streams": "shared"}
        values = {k: saved[section_name].get(k, old.get(k)) for k in keys}
        current = getattr(cfg, section_name)
        notes += [f"--{k} {v if not isinstance(v, list) else ' '.join(v)}" for k, v in values.items()
                  if v != getattr(current, k)]
        changes[section_name] = replace(current, **values)
    if notes:
        print(f"  the saved run's design (config.json), not the command line's: {', '.join(notes)}", flush=True)
    return replace(cfg, **changes)


def run_statistics_and_plot(cfg, contexts=None):
    """Statistics, tables, the figure and the selection report, from the saved runs alone (and ``contexts``,
    the comparison sets of contexts.json, else read from the output folder)."""
    ft, out = cfg.finetune, cfg.run.output_dir
    records = artifacts.load_runs(out, ft.methods, ft.num_runs, cfg.run.num_pipelines,
                                  shared_baseline=cfg.run.pipeline_streams == "shared")
    learners = []
    for p in range(cfg.run.num_pipelines):
        path = os.path.join(artifacts.pipeline_dir(out, p), artifacts.LEARNER_METRICS)
        learners.append(artifacts.read_json(path) if os.path.exists(path) else None)
    results = compare_all(records, learners)
    artifacts.write_json(os.path.join(out, artifacts.RESULTS), results)
    table = markdown_tables(results)
    artifacts.write_text(os.path.join(out, artifacts.RESULTS_TABLE), table)
    costs = cost_table(results, records)  # wall times included: apart from the reproducible results
    if costs:
        artifacts.write_text(os.path.join(out, artifacts.COSTS_TABLE), costs)
    artifacts.write_figure(os.path.join(out, artifacts.FIGURE), plot_results(results, records))
    # the selection report: what each method kept (sources, unigram KL, pretrained loss, overlap with IGF)
    path = os.path.join(out, artifacts.CONTEXTS)
    contexts = contexts or (artifacts.read_json(path) if os.path.exists(path) else None)
    report = selection_report(records, contexts) if contexts else None
    if report:
        selection_table = selection_markdown(report)
        artifacts.write_json(os.path.join(out, artifacts.SELECTION), report)
        artifacts.write_text(os.path.join(out, artifacts.SELECTION_TABLE), selection_table)
        artifacts.write_figure(os.path.join(out, artifacts.SELECTION_FIGURE), plot_selection(report))
    section("5) statistics")
    print(table + (f"\n## What each method costs\n\n{costs}" if costs else ""), flush=True)
    if report:
        print(selection_table, flush=True)
    print(f"  tables: {os.path.join(out, artifacts.RESULTS_TABLE)}, {os.path.join(out, artifacts.SELECTION_TABLE)}; "
          f"figures: {os.path.join(out, artifacts.FIGURE)}, {os.path.join(out, artifacts.SELECTION_FIGURE)}",
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
            results = run_stages(cfg, launch)
        launch.close()  # the others wait while the main process writes the statistics, figure and config
        return results
    finally:
        if lock is not None:
            lock.release()


def run_stages(cfg: Config, launch):
    out, stages = cfg.run.output_dir, cfg.run.stages
    print("configuration:\n" + artifacts.dumps(cfg.to_dict()), flush=True)
    print(f"launch: {launch.describe()}", flush=True)
    print(use_allocator(cfg.run.allocator), flush=True)  # before the model loads: every large block is affected
    timings, start, contexts, worked = {}, time.perf_counter(), None, False
    if stages != ["plot"]:
        device = resolve_device(cfg.run.device, launch)
        model, tokenizer, sets, ids, data_summary = load_model_and_contexts(cfg, device)
        if cfg.run.overwrite_output_dir:  # only now that model and data loaded: bad input must not cost old results
            if "ig_pairs" not in stages:
                raise IGFError("--overwrite_output_dir deletes every artifact, so it needs all stages from ig_pairs "
                               f"on (got --stages {' '.join(stages)})")
            if launch.is_main:
                artifacts.prepare_output_dir(out, overwrite=True)
            launch.wait()
        # 1) objective sets: sampled from held-out text, disjoint from the test set and the training pool; one per
        #    pipeline (--num_pipelines), each with its own IG pairs and learner
        pipelines = make_pipelines(cfg, sets)
        contexts = contexts_summary(sets, [(p.objective, p.objective_rows) for p in pipelines], ids["model"]["vocab"])
        timings["load"] = time.perf_counter() - start
        # the controls keep what IGF keeps, so they need the learner too (unless --keep_fraction says how much)
        labelled = needs_labels(cfg.finetune)
        learner_stage = needs_learner(cfg.finetune) and bool({"learner", "finetune"} & set(stages))
        if not labelled and {"ig_pairs", "learner"} & set(stages):
            print("\nno method among --methods needs them: IG pairs and the secondary learner are skipped",
                  flush=True)
        elif labelled and not needs_learner(cfg.finetune) and "learner" in stages:
            print("\nno method among --methods needs the secondary learner: it is skipped", flush=True)
        for pipe in pipelines if labelled and {"ig_pairs", "learner", "finetune"} & set(stages) else []:
            # 2) information gain of single training contexts, measured on the objective set (labels sharded)
            t = time.perf_counter()
            (run_ig_pairs(cfg, pipe, model, sets, ids, device, launch) if "ig_pairs" in stages
             else load_ig_pairs(cfg, pipe, sets, ids))
            timings["ig_pairs"] = timings.get("ig_pairs", 0.0) + time.perf_counter() - t
            if learner_stage:
                # 3) secondary learner: tokens -> predicted z-scored IG (trained and saved by the main process)
                t = time.perf_counter()
                if launch.is_main:
                    run_learner(cfg, pipe, model, sets, ids, train_it="learner" in stages)
                launch.wait()
                if not launch.is_main:
                    run_learner(cfg, pipe, model, sets, ids, train_it=False, write=False)
                timings["learner"] = timings.get("learner", 0.0) + time.perf_counter() - t
        if learner_stage and "finetune" in stages:
            check_learners(cfg, pipelines)  # the gate: no fine-tuning with a learner that ranks no better than chance
        if "finetune" in stages:
            # 4) fine-tune: every method on the same seeds, optimizer and candidate streams (runs dealt out)
            t = time.perf_counter()
            worked = run_finetune(cfg, model, tokenizer, sets, pipelines, ids, device, launch) > 0
            launch.wait()
            timings["finetune"] = time.perf_counter() - t
    results = None
    if "plot" in stages and launch.is_main:
        # 5) statistics and figure, from the saved runs alone (a redraw: as the saved run's design arranges them)
        results = run_statistics_and_plot(saved_design(cfg) if stages == ["plot"] else cfg, contexts)
    timings["total"] = time.perf_counter() - start
    timings.update(launch.describe())
    # written only after every stage succeeded, so a refused or failed invocation leaves the directory as it was
    if launch.is_main:
        if stages != ["plot"]:  # a redraw leaves the configuration and timings of the run that made the results
            artifacts.write_json(os.path.join(out, artifacts.CONFIG), {**cfg.to_dict(), "launch": launch.describe()})
            artifacts.write_json(os.path.join(out, artifacts.DATA), data_summary)
            artifacts.write_json(os.path.join(out, artifacts.CONTEXTS), contexts)
            # the timings of the invocation that computed the results: a resume with nothing to do keeps them
            worked = worked or any(p.labelled or p.trained for p in pipelines)
            if worked or not os.path.exists(os.path.join(out, artifacts.TIMINGS)):
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
