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
    <output_dir>/igf_output.json         the mark of a folder this project writes into: with it, every name above
                                         in the folder was written by run_clm_igf.py (what --overwrite_output_dir
                                         removes, and nothing else)

IG pairs, the learner and every run carry a ``fingerprint``: the configuration (and model weights) that
determine them. Resuming with a different
fingerprint is refused rather than mixing results; ``--overwrite_output_dir`` starts over. A folder holding one of
these names that this project did not write (no igf_output.json, and no run configuration in its config.json) is
refused, so a run never writes over or deletes the user's own files.

The filter's outputs are written here too: ``AtomicOutput`` and ``commit`` put a set of JSONL files in place all
or none.
"""
import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile

import orjson
import torch

from .errors import IGFError
from .paths import touches, within

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
TIMINGS = "timings.json"  # wall-clock seconds per stage (with run_seconds/ and costs.md, what differs between
# identical runs)
MANIFEST = "igf_output.json"  # marks the folder as one run_clm_igf.py writes into (prepare_output_dir)
OUTPUT_KIND = "igf-output-dir"
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


def trained_sha(state):
    """Hash of a learner's trained weights (its ``trainable_state``): in every run fingerprint, and what tells a
    learner folder written for this learner from a stale one."""
    return sha(torch.cat([v.detach().flatten() for v in state.values()]))


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
    """Hash of a tokenizer's full definition (vocabulary, merges, normalizer), where the fast backend has one (a
    transformers tokenizer or its ``tokenizers.Tokenizer``: the same hash)."""
    backend = tokenizer if hasattr(tokenizer, "to_str") else getattr(tokenizer, "backend_tokenizer", None)
    return sha(backend.to_str().encode() if backend is not None else sorted(tokenizer.get_vocab().items()))


def dumps(obj) -> str:
    """Canonical JSON: same values give the same bytes (sorted keys, repr floats)."""
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n"


def umask():
    """The process's umask (only os.umask tells it: set it and put it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_file(path):
    """(fd, name) of a new temporary file beside ``path``, with the permissions the umask gives a new file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes the file private; an output gets the usual permissions
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


def replaceable(folder, is_own):
    """None when ``folder`` may be replaced by a new one: it does not exist, is an empty folder, or ``is_own(folder)``
    says this project wrote it; else why not (a file, the working directory, a folder of someone else's files)."""
    if not os.path.lexists(folder):
        return None
    if os.path.islink(folder) or not os.path.isdir(folder):
        return "it is not a folder"
    if within(os.getcwd(), folder):
        return "it is (or holds) the working directory"
    if not os.listdir(folder) or is_own(folder):
        return None
    return "it holds files that were not written by this project"


@contextlib.contextmanager
def new_folder(folder, what, is_own=lambda folder: False):
    """A temporary folder beside ``folder``, for the block to fill; it replaces ``folder`` when the block succeeds
    (never a half-written model or learner). Only a missing or empty folder, or one that ``is_own`` recognizes as
    this project's, is replaced: any other is refused in one line before the block runs. The folder gets the
    umask's permissions, as a folder made by mkdir. An OSError ends in one IGFError line naming ``what``."""
    why = replaceable(folder, is_own)
    if why:
        raise IGFError(f"will not save {what} to {folder}: {why}; give a new or empty folder")
    tmp = None
    try:
        parent = os.path.dirname(os.path.abspath(folder))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(folder))}.")
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private
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


def touched_artifact(path, output_dir, pipeline=0):
    """The name of the run artifact in ``output_dir`` (its own or pipeline ``pipeline``'s) that writing ``path``
    would change, else None: a command's output must not replace the record it reads."""
    for name in (*ALL, MANIFEST):
        if touches(path, os.path.join(pipeline_dir(output_dir, pipeline), name)) or \
                touches(path, os.path.join(output_dir, name)):
            return name
    return None


def output_dirs_around(path):
    """The folders above ``path`` (``path`` included) that run_clm_igf.py wrote into (its mark, or a run
    configuration): writing ``path`` must not touch their artifacts, whichever command or source is at hand."""
    folder = os.path.realpath(path)
    while True:
        if os.path.isfile(os.path.join(folder, MANIFEST)) or is_run_config(os.path.join(folder, CONFIG)):
            yield folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


def is_run_config(path):
    """Whether ``path`` is a config.json that run_clm_igf.py wrote (its five sections: data, ig, learner, ...)."""
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"data", "ig", "learner", "finetune", "run"} <= set(config)


def foreign_artifacts(output_dir):
    """The artifact names in ``output_dir`` that this project did not write: none when the folder carries its
    mark (MANIFEST) or, made by a version before the mark, its config.json is a run configuration; else every
    artifact name present (a user's own config.json, models/ or runs/ folder) but IG pairs and a learner file
    carrying a fingerprint (copied from another output folder to be reused)."""
    if not os.path.isdir(output_dir):
        return []
    mark = os.path.join(output_dir, MANIFEST)
    if os.path.exists(mark):
        try:
            with open(mark, encoding="utf-8") as fh:
                if json.load(fh).get("igf_kind") == OUTPUT_KIND:
                    return []
        except (OSError, ValueError, AttributeError):
            pass
        return [MANIFEST]
    if is_run_config(os.path.join(output_dir, CONFIG)):
        return []
    return [name for name in ALL if os.path.lexists(os.path.join(output_dir, name))
            and not _fingerprinted(os.path.join(output_dir, name))]


def _fingerprinted(path):
    """Whether ``path`` is IG pairs or a learner file this project wrote (it carries a configuration fingerprint):
    copied into a new folder to be reused, it is the run's own."""
    name = os.path.basename(path)
    try:
        if name == IG_PAIRS:
            with open(path, encoding="utf-8") as fh:
                return isinstance(json.load(fh).get("fingerprint"), dict)
        if name == LEARNER:
            return isinstance(torch.load(path, map_location="cpu", weights_only=True).get("fingerprint"), dict)
    except Exception:  # not ours: unreadable, or not a dict
        return False
    return False


def prepare_output_dir(output_dir, overwrite):
    """Create the output directory (with the umask's permissions), mark it as this project's and prove it is
    writable; with ``overwrite``, delete the artifacts an earlier run wrote there, and nothing else. A folder
    holding files under artifact names that this project did not write is refused before anything is written."""
    foreign = foreign_artifacts(output_dir)
    if foreign:
        raise IGFError(f"--output_dir {output_dir} holds {', '.join(foreign)}, which run_clm_igf.py did not write "
                       f"(no {MANIFEST}); choose another --output_dir (nothing was written or deleted)")
    try:
        os.makedirs(os.path.join(output_dir, RUNS), exist_ok=True)
        if overwrite:
            for name in ALL:
                path = os.path.join(output_dir, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif os.path.lexists(path):
                    os.remove(path)
            os.makedirs(os.path.join(output_dir, RUNS), exist_ok=True)
        if not os.path.exists(os.path.join(output_dir, MANIFEST)):
            write_json(os.path.join(output_dir, MANIFEST), {"igf_kind": OUTPUT_KIND, "format": 1, "written_by":
                                                           "run_clm_igf.py", "artifacts": list(ALL)})
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
    if "standard" in records:
        check_pairs(output_dir, records, shared_baseline)
    return records


def check_pairs(output_dir, records, shared_baseline):
    """Refuse runs that cannot pair with the baseline the design names: every run's candidate stream (its
    fingerprint's "stream") must be one a standard run of its pipeline (pipeline 0's, with shared streams) drew,
    as the statistics pair runs by stream."""
    for method, by_pipeline in records.items():
        if method == "standard":
            continue
        for p, recs in by_pipeline.items():
            base = records["standard"].get(0 if shared_baseline else p, [])
            streams = {(r.get("fingerprint") or {}).get("stream") for r in base}
            for rec in recs:
                stream = (rec.get("fingerprint") or {}).get("stream")
                if stream is not None and stream not in streams:
                    raise IGFError(f"{method} run {rec.get('run')} of pipeline {p} in {output_dir} drew candidate "
                                   f"stream {stream}, which no standard run of "
                                   f"{'pipeline 0' if shared_baseline else f'pipeline {p}'} drew: the runs were "
                                   "made with another --pipeline_streams or --num_pipelines than the statistics "
                                   "assume; use the design of the run's config.json")


# ----------------------------------------------------------------------------- outputs written all or none

class AtomicOutput:
    """A JSONL file written to a temporary file beside ``path``; ``commit`` puts a set of them in place."""

    def __init__(self, path):
        self.path = path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fd, self.tmp = temp_file(path)  # the umask's permissions, as every artifact
        except OSError as e:
            raise self.error(e) from None
        self.fh = os.fdopen(fd, "wb")

    def error(self, e):
        return IGFError(f"cannot write {self.path} ({e.strerror})")

    def write(self, record):
        """One JSON line, UTF-8, compact. orjson rather than json: the filter writes a line per kept context, and
        json.dumps took as long as scoring them with one learner (7x faster here, the same values). A NaN or
        infinite number is written as null (valid JSON; json wrote NaN, which JSON readers refuse)."""
        try:
            line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY)
        except TypeError as e:  # orjson.JSONEncodeError: a value JSON cannot hold (a str that is not UTF-8)
            raise IGFError(f"cannot write {self.path}: a record holds a value JSON cannot ({e})") from None
        try:
            self.fh.write(line)
        except OSError as e:  # a full disk
            raise self.error(e) from None

    def close(self, sync=False):
        """Flush the data to the file (with ``sync``, to the disk) and close it."""
        try:
            self.fh.flush()
            if sync:
                os.fsync(self.fh.fileno())
            self.fh.close()
        except OSError as e:
            raise self.error(e) from None

    def discard(self):
        try:
            self.fh.close()
        except OSError:  # the flush of a file being thrown away failed: nothing to keep
            pass
        _remove(self.tmp)


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def commit(outputs):
    """Put every output in place or none: every write and fsync (what a full disk fails) comes before the first
    rename, and each rename but the last keeps a hard link to the file it replaces, so that a later failure can
    put the user's file back. What remains: a kill -9 or power loss between the renames (microseconds) leaves the
    earlier outputs new, the later ones old, and a hidden ``.<name>.*.tmp.old`` copy of a replaced file beside
    it; the renames reach the disk when the folder's metadata does (the folder is not fsynced)."""
    for out in outputs:
        out.close(sync=True)
    backups, done, out = {}, [], None  # {path: hard link to the file it had}, paths renamed so far
    try:
        for out in outputs:
            if out is not outputs[-1] and os.path.lexists(out.path):
                backups[out.path] = out.tmp + ".old"
                try:
                    os.link(out.path, backups[out.path], follow_symlinks=False)
                except OSError:  # a file system without hard links
                    shutil.copy2(out.path, backups[out.path], follow_symlinks=False)
            os.replace(out.tmp, out.path)
            done.append(out.path)
    except BaseException as e:  # an interruption is undone as well; only an OSError is the user's to fix
        try:
            for path in reversed(done):
                if path in backups:
                    os.replace(backups.pop(path), path)
                else:
                    os.remove(path)
        except OSError:
            raise IGFError(f"cannot write {out.path} ({getattr(e, 'strerror', e)}) nor put back the files it "
                           f"replaced: they are kept as {', '.join(backups.values())}") from None
        for path in backups.values():
            _remove(path)
        if isinstance(e, OSError):
            raise out.error(e) from None
        raise
    for path in backups.values():
        _remove(path)
