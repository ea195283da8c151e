"""What the study benchmarks share: the study's model, contexts and one pipeline's objective set and labels, built
exactly as the driver builds them (run_clm_igf.load_model_and_contexts and the configuration's seeds), and checked
against the hashes its saved labels record."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from igf import artifacts  # noqa: E402
from igf.artifacts import sha  # noqa: E402
from igf.config import parse_args, stage_seed  # noqa: E402
from igf.pipelines import with_tokens  # noqa: E402


def load_study(flags):
    """(cfg, model, sets) of the driver's flags (e.g. ["--preset", "study"]): the float32 model and contexts, on
    the CPU."""
    import run_clm_igf  # the driver's own loading, so the pool and test set are the study's

    cfg = parse_args(flags)
    model, _, sets, _, _ = run_clm_igf.load_model_and_contexts(cfg, torch.device("cpu"))
    return cfg, model, sets


def pipeline_objective(cfg, sets, p):
    """Pipeline p's objective set (N_obj, T) and its rows in the validation windows."""
    return sets.objective_set(cfg.data.size_objective_set, stage_seed(cfg.run.seed, "objective_set", p))


def saved_labels(cfg, sets, p, objective):
    """Pipeline p's saved IG pairs (tokens put back from the pool), refused unless measured on this pool and
    objective set; None when the folder has none."""
    path = os.path.join(artifacts.pipeline_dir(cfg.run.output_dir, p), artifacts.IG_PAIRS)
    if not os.path.exists(path):
        return None
    pairs = with_tokens(artifacts.read_json(path), sets.train, path)
    if pairs["fingerprint"]["train"] != sha(sets.train) or pairs["fingerprint"]["objective"] != sha(objective):
        raise SystemExit(f"{path} was measured on another pool or objective set")
    return pairs


def source_group_of(sets):
    """The source group (corpus, e.g. 'kjv') of every pool row, or None when sources are unknown."""
    if sets.sources is None:
        return None
    return [sets.source_names[int(i)].split("/", 1)[0] for i in sets.sources["train"]]
