"""The output directory: artifact names, atomic writes, and the checks that make resuming safe.

    <output_dir>/config.json             the resolved configuration of the latest completed run (not of a redraw)
    <output_dir>/data.json               token and context counts of each split, and where the text came from
    <output_dir>/contexts.json           sources and unigram counts of the pool, the objective sets and the test set
                                         (what the selection report compares the kept contexts with)
    <output_dir>/ig_pairs.json           IG pairs: pool row, raw IG, z-scored IG, the context's own perplexity, stats
    <output_dir>/secondary_learner.pt    learner weights (without the frozen embedding copy), architecture, metrics,
                                         and what it was built on: LM, tokenizer, context length, score scale
    <output_dir>/secondary_learner.json  learner metrics (Pearson / Spearman on held-out pairs)
    <output_dir>/learner/                the learner as a shareable folder (igf/learner.py): config.json,
                                         model.safetensors (with its embedding copy), tokenizer files, README.md
    <output_dir>/runs/<method>_run<rrr>.json  one fine-tuning run: test-perplexity curve, candidates drawn, kept rows,
                                         what the rule scored, its cost in LM forward-equivalents
    <output_dir>/run_seconds/<method>_run<rrr>.json  that run's wall times (apart: the record is reproducible)
    <output_dir>/pipelines/<p>/          pipeline p >= 1 (--num_pipelines): its ig_pairs, learner and runs/, laid
                                         out as above (pipeline 0 is the top level; standard runs are shared)
    <output_dir>/results.json            statistics over runs (median, mean, SE, Welch / Mann-Whitney / paired
                                         Wilcoxon tests, Hedges' g vs standard and IGF vs the controls, within and
                                         across pipelines) and the learners' metrics
    <output_dir>/results.md              the same as Markdown tables (printed at the end of a run)
    <output_dir>/result_igf.png          the figure (curves, paired difference from standard, final perplexities)
    <output_dir>/selection.json, .md     the selection report: what each method kept (sources, unigram KL, loss)
    <output_dir>/selection.png           the report's figure
    <output_dir>/models/<method>/        with --save_models: run 0's fine-tuned model, tokenizer and model card
    <output_dir>/timings.json            wall-clock seconds of each stage

IG pairs, the learner and every run carry a ``fingerprint``: the configuration (and model weights) that
determine them. Resuming with a different
fingerprint is refused rather than mixing results; ``--overwrite_output_dir`` starts over.
"""
import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile

import torch

from .errors import IGFError

CONFIG = "config.json"
DATA = "data.json"
CONTEXTS = "contexts.json"
IG_PAIRS = "ig_pairs.json"
LEARNER = "secondary_learner.pt"
LEARNER_METRICS = "secondary_learner.json"
LEARNER_FOLDER = "learner"  # Learner.save_pretrained's folder, in each pipeline's folder
RUNS = "runs"
RUN_SECONDS = "run_seconds"
PIPELINES = "pipelines"
RESULTS = "results.json"
RESULTS_TABLE = "results.md"
COSTS_TABLE = "costs.md"
FIGURE = "result_igf.png"
SELECTION = "selection.json"
SELECTION_TABLE = "selection.md"
SELECTION_FIGURE = "selection.png"
MODELS = "models"
TIMINGS = "timings.json"  # wall-clock seconds per stage (the only artifact that differs between identical runs)
ALL = (CONFIG, DATA, CONTEXTS, IG_PAIRS, LEARNER, LEARNER_METRICS, LEARNER_FOLDER, RUNS, RUN_SECONDS, PIPELINES,
       RESULTS, RESULTS_TABLE, COSTS_TABLE, FIGURE, SELECTION, SELECTION_TABLE, SELECTION_FIGURE, MODELS, TIMINGS)


def pipeline_dir(output_dir, pipeline):
    """Where pipeline ``pipeline``'s IG pairs, learner and runs live: the output folder itself for pipeline 0."""
    return output_dir if pipeline == 0 else os.path.join(output_dir, PIPELINES, str(pipeline))


def run_path(output_dir, method, pipeline, run):
    """The file of one fine-tuning run (with --pipeline_streams shared, standard's runs sit under pipeline 0)."""
    return os.path.join(pipeline_dir(output_dir, pipeline), RUNS, f"{method}_run{run:03d}.json")


def seconds_path(run_file):
    """Where a run's wall times lie: in run_seconds/ beside runs/, apart from its record, which stays byte-for-byte
    reproducible without them."""
    runs, name = os.path.split(run_file)
    return os.path.join(os.path.dirname(runs), RUN_SECONDS, name)


def read_run(path):
    """A run record, with its wall times (``seconds_path``) as record["seconds"] where they were kept."""
    record = read_json(path)
    if os.path.exists(seconds_path(path)):
        record["seconds"] = read_json(seconds_path(path))
    return record


# ----------------------------------------------------------------------------- fingerprints

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


def tensors_sha(tensors):
    """Hash of named tensors (a safetensors file's contents): names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy())  # the buffer itself: no copy of a 100 MB embedding table
    return h.hexdigest()[:16]


def file_sha(path):
    with open(path, "rb") as fh:
        return sha(fh.read())


def files_sha(files):
    """Hash of a list of (file, source name): names, order and contents (a folder of text, or one file)."""
    return sha([[name, file_sha(path)] for path, name in files])


def tokenizer_sha(tokenizer):
    """Hash of a tokenizer's full definition (vocabulary, merges, normalizer), where the fast backend has one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return sha(backend.to_str().encode() if backend is not None else sorted(tokenizer.get_vocab().items()))


def dumps(obj) -> str:
    """Canonical JSON: same values give the same bytes (sorted keys, repr floats)."""
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n"


def temp_file(path):
    """(fd, name) of a new temporary file beside ``path``, with the permissions the umask gives a new file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    umask = os.umask(0)  # read the umask (only os.umask tells it) and put it back
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; an output gets the usual permissions
    except OSError:
        os.close(fd)
        os.remove(tmp)
        raise
    return fd, tmp


def _atomic(path, write):
    """Write through a temporary file in the same folder, fsync, then rename: never a half-written file."""
    fd, tmp = temp_file(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def new_folder(folder, what):
    """A temporary folder beside ``folder``, for the block to fill; it replaces ``folder`` when the block succeeds
    (never a half-written model or learner). An OSError ends in one IGFError line naming ``what``."""
    tmp = None
    try:
        parent = os.path.dirname(os.path.abspath(folder))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(folder))}.")
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as e:
        raise IGFError(f"cannot save {what} to {folder} ({e.strerror})") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path, obj):
    _atomic(path, lambda fh: fh.write(dumps(obj).encode()))


def write_text(path, text):
    _atomic(path, lambda fh: fh.write(text.encode()))


def write_torch(path, obj):
    _atomic(path, lambda fh: torch.save(obj, fh))


def write_figure(path, fig):
    import matplotlib.pyplot as plt

    _atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)


def read_json(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IGFError(f"corrupt artifact {path} ({e.__class__.__name__}: {e}); delete it or use "
                       "--overwrite_output_dir") from None


def read_torch(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise IGFError(f"corrupt artifact {path} ({e.__class__.__name__}); delete it or use "
                       "--overwrite_output_dir") from None


def prepare_output_dir(output_dir, overwrite):
    """Create (or, with overwrite, empty) the output directory and prove it is writable."""
    try:
        if overwrite:
            for name in ALL:
                path = os.path.join(output_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        os.makedirs(os.path.join(output_dir, RUNS), exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise IGFError(f"--output_dir {output_dir} is not writable ({e.strerror})") from None


def _differences(saved, expected, prefix=""):
    """[(dotted key, saved value, expected value)] for every leaf that differs (nested dicts are walked)."""
    out = []
    for k in sorted(set(saved) | set(expected), key=str):
        s, e = saved.get(k), expected.get(k)
        if isinstance(s, dict) and isinstance(e, dict):
            out += _differences(s, e, f"{prefix}{k}.")
        elif s != e:
            out.append((f"{prefix}{k}", s, e))
    return out


def check_fingerprint(path, artifact, expected):
    """Refuse to resume from an artifact (a loaded JSON or checkpoint) made with another configuration."""
    saved = artifact.get("fingerprint") if isinstance(artifact, dict) else None
    if saved == expected:
        return
    if not isinstance(saved, dict):
        raise IGFError(f"{path} has no configuration fingerprint (not made by this version, or damaged); delete "
                       "it or use --overwrite_output_dir")
    diff = "; ".join(f"{k}: saved {s!r}, now {e!r}" for k, s, e in _differences(saved, expected))
    raise IGFError(f"{path} was made with a different configuration ({diff}); use --overwrite_output_dir "
                   "or another --output_dir")


def load_runs(output_dir, methods, num_runs, num_pipelines, shared_baseline=True):
    """{method: {pipeline: [run records]}}: every saved run of each method (at least ``num_runs`` per pipeline;
    with ``shared_baseline`` (--pipeline_streams shared) standard's runs do not depend on the pipeline and sit
    under pipeline 0), all made with one shared configuration."""
    records, missing = {}, []
    for method in methods:
        records[method] = {}
        for p in range(1 if method == "standard" and shared_baseline else num_pipelines):
            missing += [os.path.relpath(run_path(output_dir, method, p, r), output_dir) for r in range(num_runs)
                        if not os.path.exists(run_path(output_dir, method, p, r))]
            pattern = os.path.join(pipeline_dir(output_dir, p), RUNS, f"{method}_run[0-9][0-9][0-9].json")
            records[method][p] = [read_run(path) for path in sorted(glob.glob(pattern))]
    if missing:
        raise IGFError(f"{len(missing)} fine-tuning runs are missing from {output_dir} (e.g. {missing[0]}); "
                       "run the finetune stage")
    shared = {}  # what every method's runs must have in common: model, data, optimizer, steps, seed, device
    for method, by_pipeline in records.items():
        for rec in (r for recs in by_pipeline.values() for r in recs):
            common = {k: v for k, v in (rec.get("fingerprint") or {}).items()
                      if k not in ("method", "selection", "stream")}
            if shared and common != shared:
                raise IGFError(f"saved runs in {output_dir} were made with different configurations (e.g. {method} "
                               f"run {rec.get('run')}); keep one configuration per --output_dir")
            shared = common
    return records
