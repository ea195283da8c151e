"""The output directory: artifact names, atomic writes, and the checks that make resuming safe.

    <output_dir>/config.json             the resolved configuration of the latest completed run (not of a redraw)
    <output_dir>/data.json               token and context counts of each split, and where the text came from
    <output_dir>/ig_pairs.json           IG pairs: tokens, raw IG, z-scored IG, the context's own perplexity, stats
    <output_dir>/secondary_learner.pt    learner weights (without the frozen embedding copy), architecture, metrics
    <output_dir>/secondary_learner.json  learner metrics (Pearson / Spearman on held-out pairs)
    <output_dir>/runs/<method>_run<rrr>.json  one fine-tuning run: test-perplexity curve, candidates drawn
    <output_dir>/results.json            statistics over runs (median, mean, SE, Welch / Mann-Whitney / paired
                                         Wilcoxon tests, Hedges' g vs standard) and the learner's metrics
    <output_dir>/results.md              the same as one Markdown table (printed at the end of a run)
    <output_dir>/result_igf.png          the figure (left: curves; right: final perplexities)
    <output_dir>/timings.json            wall-clock seconds of each stage

IG pairs, the learner and every run carry a ``fingerprint``: the configuration (and model weights) that
determine them. Resuming with a different
fingerprint is refused rather than mixing results; ``--overwrite_output_dir`` starts over.
"""
import json
import os
import shutil
import tempfile

import torch

from .errors import IGFError

CONFIG = "config.json"
DATA = "data.json"
IG_PAIRS = "ig_pairs.json"
LEARNER = "secondary_learner.pt"
LEARNER_METRICS = "secondary_learner.json"
RUNS = "runs"
RESULTS = "results.json"
RESULTS_TABLE = "results.md"
FIGURE = "result_igf.png"
TIMINGS = "timings.json"  # wall-clock seconds per stage (the only artifact that differs between identical runs)
ALL = (CONFIG, DATA, IG_PAIRS, LEARNER, LEARNER_METRICS, RUNS, RESULTS, RESULTS_TABLE, FIGURE, TIMINGS)


def dumps(obj) -> str:
    """Canonical JSON: same values give the same bytes (sorted keys, repr floats)."""
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n"


def _atomic(path, write):
    """Write through a temporary file in the same folder, fsync, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; an artifact gets the usual permissions
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
