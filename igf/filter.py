"""The reusable filter: apply a trained secondary learner to new text and keep the contexts it predicts to be
informative for the objective set, without retraining.

    python -m igf.filter OUTPUT_DIR --input corpus/ --output kept.jsonl                  # z >= 0, as igf_constant
    python -m igf.filter OUTPUT_DIR --input docs.jsonl --text_field body --top_fraction 0.1 --output top10.jsonl
    python -m igf.filter OUTPUT_DIR --dataset_name wikitext --dataset_config_name wikitext-103-raw-v1 \\
        --split train --output kept.jsonl --scores all_scores.jsonl
    python -m igf.filter OUTPUT_DIR/learner --input corpus/ --output kept.jsonl          # a shared learner folder

The learner: OUTPUT_DIR's (its ``learner/`` folder when that was written for the learner file, else the learner
file on its LM), or a learner folder (igf/learner.py: no LM loaded). It is loaded through ``igf.Learner``, the
object users call from Python; its held-out quality is printed, and a learner no better than chance (the driver's
gate) is refused unless ``--allow_weak_learner``.

Input: a text file, a folder of text files (sorted by path), a JSONL file (``--text_field``), or a hub dataset
(``--dataset_name``, ``--split``, streamed). Contexts are cut exactly as training cuts them: each line (or JSONL
record, or dataset row) is tokenized on its own by the LM's tokenizer, the rows are concatenated and cut into
non-overlapping windows of the learner's context length (the tail is dropped), so filtering the training text
gives the training pool's contexts.

Scores are on the z scale of IGF's thresholds: (predicted IG - pool mean) / pool std, the training pool's mean
and standard deviation recorded in the learner file. ``--threshold Z`` keeps contexts with z >= Z, so filtering
the training text at 0 keeps exactly the pool contexts that igf_constant at --constant_threshold 0 accepts.
``--top_fraction F`` keeps exactly ceil(F * n) contexts, the highest scored (ties: the earlier in the input), in
two passes over the scores: every context is first written to a temporary file beside the output.

Output: JSON lines with the context's text, token ids, score and origin (file and 1-based line of its first token,
or dataset row), readable with ``datasets.load_dataset("json", data_files=...)``; ``--scores`` also writes every
context's score and origin. ``text`` is the decoded window (a window cut inside a multi-byte character decodes to
U+FFFD there); ``input_ids`` are exact. Outputs that would overwrite the input (or each other) or lie inside the
input folder are refused before any work. Outputs are written to temporary files beside them (with the umask's
permissions), fsynced and renamed all or none when complete, so an interrupted or failed run leaves no
half-written output and keeps the previous ones (rerun the command to start again). Memory does not grow with the
corpus (``--top_fraction`` keeps 4 bytes per context for its second pass).

Under ``accelerate launch`` the input's rows are dealt out in chunks (chunk i of every round to process i, which
tokenizes it); the main process gathers the tokens in input order, scores and writes the one output.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from . import artifacts, assets
from .config import same_path, within
from .data import read_lines, text_files
from .distributed import Launch
from .errors import IGFError
from .secondary_learner import gate_refusal, load_saved_learner

ROWS_PER_CHUNK = 8192  # default --rows_per_chunk: rows tokenized in one call (dealt to one process under a launch)
SCORE_BATCH = 4096  # contexts scored at once


# ----------------------------------------------------------------------------- the learner

def load_learner(output_dir, pipeline=0, model_name_or_path=None, cache_dir=None, context_len=None):
    """The ``Learner`` (igf/learner.py) of a learner folder, or of the run in the output folder ``output_dir``:
    there its learner folder (``<pipeline folder>/learner``) when that was written for this learner file, else the
    learner file on the LM it was built on (or ``model_name_or_path``, refused unless it has the same weights,
    tokenizer and context length). Either way, refused unless its context length is ``context_len`` (if given)."""
    from .learner import Learner, is_fresh, is_learner_folder, trained_sha  # igf.learner imports this module

    start = time.perf_counter()
    if is_learner_folder(output_dir):
        if model_name_or_path:
            raise IGFError(f"{output_dir} is a learner folder: it carries its own embeddings and tokenizer, so "
                           "--model_name_or_path (for an output folder) does not apply")
        learner = Learner.from_pretrained(output_dir)
        if context_len is not None and context_len != learner.context_len:
            raise IGFError(f"the learner in {output_dir} was built on contexts of {learner.context_len} tokens, "
                           f"not --context_len {context_len}")
        return learner
    path = os.path.join(artifacts.pipeline_dir(output_dir, pipeline), artifacts.LEARNER)
    if not os.path.exists(path):
        raise IGFError(f"{path} not found: train a learner first (python run_clm_igf.py --output_dir {output_dir} "
                       "--stages ig_pairs learner)")
    saved = artifacts.read_torch(path)
    if not isinstance(saved, dict) or not {"state", "arch"} <= set(saved):
        raise IGFError(f"{path} is not a secondary learner file")
    built_on = saved.get("built_on")
    if built_on is None:
        raise IGFError(f"{path} does not record the LM it was built on (made by an older version); retrain it with "
                       f"python run_clm_igf.py --output_dir {output_dir} --stages learner")
    if context_len is not None and context_len != built_on["context_len"]:
        raise IGFError(f"the learner in {path} was built on contexts of {built_on['context_len']} tokens, not "
                       f"--context_len {context_len}")
    folder = os.path.join(artifacts.pipeline_dir(output_dir, pipeline), artifacts.LEARNER_FOLDER)
    if model_name_or_path is None and is_fresh(folder, {"fingerprint": artifacts.sha(saved.get("fingerprint")),
                                                        "trained_weights": trained_sha(saved["state"])}):
        return Learner.from_pretrained(folder)  # the same weights, without loading the LM
    name = model_name_or_path or built_on["model"]["model"]
    model, tokenizer = assets.load_pretrained(assets.resolve_model_path(name, cache_dir), torch.float32)
    weights = artifacts.weights_sha(model)
    if weights != built_on["model"]["weights"]:
        raise IGFError(f"the learner in {path} was built on {built_on['model']['model']!r} (weights "
                       f"{built_on['model']['weights']}), not on {name!r} (weights {weights}); use its LM")
    if artifacts.tokenizer_sha(tokenizer) != built_on["tokenizer"]:
        raise IGFError(f"the learner in {path} was built with another tokenizer than {name!r}'s")
    model = load_saved_learner(path, saved, model.get_input_embeddings().weight)  # its own copy: the LM goes
    config = {"context_len": built_on["context_len"], "scale": saved["scale"], "metrics": saved.get("metrics"),
              "built_on": {"model": name, "weights": weights, "tokenizer": built_on["tokenizer"]}}
    learner = Learner(model, tokenizer, config, source=path)
    learner.tables  # noqa: B018 (built now, as Learner.from_pretrained does)
    learner.load_seconds = time.perf_counter() - start
    return learner


def z_scores(learner, tables, contexts, mean, std):
    """Predicted IG of contexts (N, T) on the pool's z scale, float32 as IGF computes it (igf/selection.py)."""
    return (learner.scores(contexts, tables) - mean) / std


# ----------------------------------------------------------------------------- input rows

def input_rows(args):
    """(kind, iterator of (text, origin dict)): the rows training would tokenize one by one."""
    if args.dataset_name:
        import datasets

        try:
            ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.split, streaming=True)
        except Exception as e:  # offline hub, unknown name or split
            raise IGFError(f"cannot load dataset {args.dataset_name!r} split {args.split!r} "
                           f"({e.__class__.__name__})") from None

        def hub():
            for i, row in enumerate(ds):
                if args.text_field not in row:
                    raise IGFError(f"dataset {args.dataset_name!r} has no field {args.text_field!r} (--text_field); "
                                   f"its fields: {', '.join(row)}")
                yield row[args.text_field], {"dataset": args.dataset_name, "split": args.split, "row": i}
        return hub()
    if args.input is None:
        raise IGFError("give --input (a text file, a folder of text files or a JSONL file) or --dataset_name")
    if os.path.isfile(args.input) and args.input.endswith((".jsonl", ".json")):
        return _jsonl_rows(args.input, args.text_field)
    files = text_files(args.input)

    def text():
        for path, _ in files:
            try:
                for i, line in enumerate(read_lines(path), start=1):
                    yield line, {"file": path, "line": i}
            except UnicodeDecodeError as e:
                raise IGFError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None
    return text()


def _jsonl_rows(path, field):
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise IGFError(f"{path} line {i} is not JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise IGFError(f"{path} line {i} has no field {field!r} (--text_field)")
            yield str(record[field]), {"file": path, "line": i}


def chunks(rows, size):
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- contexts, as training cuts them

def tokenized_chunks(rows, tokenizer, launch, rows_per_chunk=ROWS_PER_CHUNK):
    """Yield (token ids of each row, origin of each row) per chunk of rows, in input order. Under a launch, chunk
    i of every round is tokenized by process i and gathered; every process yields the same chunks."""
    backend = getattr(tokenizer, "backend_tokenizer", None)

    def tokenize(chunk):
        texts = [text for text, _ in chunk]
        if backend is not None:  # what tokenizer(texts) calls, without building attention masks and offsets
            ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        else:
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [np.asarray(x, dtype=np.int32) for x in ids], [origin for _, origin in chunk]

    if launch.num_processes == 1:
        for chunk in chunks(rows, rows_per_chunk):
            yield tokenize(chunk)
        return
    stream, done = chunks(rows, rows_per_chunk), False
    while not done:
        round_chunks = []
        for _ in range(launch.num_processes):  # every process reads the same rows; each tokenizes its chunk
            chunk = next(stream, None)
            if chunk is None:
                done = True
                break
            round_chunks.append(chunk)
        mine = tokenize(round_chunks[launch.rank]) if launch.rank < len(round_chunks) else None
        for part in launch.gather(mine):
            if part is not None:
                yield part


def _origins(positions, carried, row_start, origins):
    """The origin of the tokens at ``positions`` of a chunk's stream: the carried tokens first, then the rows
    (``row_start``: each row's offset among the new tokens; an empty row is skipped)."""
    new = np.asarray(positions, dtype=np.int64) - len(carried)
    rows = np.searchsorted(row_start, np.maximum(new, 0), side="right") - 1
    return [carried[p] if q < 0 else origins[r] for p, q, r in zip(positions, new, rows)]


def windows(tokenized, context_len):
    """(contexts (n, T) int64, origin of each one's first token) per chunk: the rows' tokens concatenated and cut
    into non-overlapping windows from the start of the input (the tail shorter than T is dropped, as in training)."""
    carry, carried = np.zeros(0, dtype=np.int32), []  # tokens not yet in a window, and each one's origin
    for ids, origins in tokenized:
        flat = np.concatenate([carry, *ids]) if ids else carry
        row_start = np.cumsum([0] + [len(x) for x in ids])
        n = len(flat) // context_len
        if n:
            yield (torch.as_tensor(flat[: n * context_len].reshape(n, context_len), dtype=torch.int64),
                   _origins(range(0, n * context_len, context_len), carried, row_start, origins))
        carried = _origins(range(n * context_len, len(flat)), carried, row_start, origins)
        carry = flat[n * context_len:]


# ----------------------------------------------------------------------------- writing

def check_outputs(args):
    """Refuse, before any work, an output that would replace the input or another output, or that lies inside
    the input folder (the next run would read it as input)."""
    outputs = [(flag, path) for flag, path in (("--output", args.output), ("--scores", args.scores),
                                               ("--summary", args.summary)) if path]
    for i, (flag, path) in enumerate(outputs):
        for other_flag, other in outputs[:i]:
            if same_path(path, other):
                raise IGFError(f"{flag} {path} is the same file as {other_flag} {other}; give two paths")
        if args.input and os.path.isdir(args.input) and within(path, args.input):
            raise IGFError(f"{flag} {path} lies inside the --input folder {args.input} (the next run would read "
                           "it as input); write it elsewhere")
        if args.input and same_path(path, args.input):
            raise IGFError(f"{flag} {path} is the --input file; write it elsewhere")


class AtomicOutput:
    """A JSONL file written to a temporary file beside ``path``; ``commit`` puts a set of them in place."""

    def __init__(self, path):
        self.path = path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fd, self.tmp = artifacts.temp_file(path)  # the umask's permissions, as every artifact
        except OSError as e:
            raise self.error(e) from None
        self.fh = os.fdopen(fd, "w", encoding="utf-8")

    def error(self, e):
        return IGFError(f"cannot write {self.path} ({e.strerror})")

    def write(self, record):
        try:
            self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")
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


def kept_record(text, ids, score, origin):
    return {"text": text, "input_ids": ids, "score": score, **origin}


def run_filter(args, launch=None):
    """Filter the input of ``args`` (the parsed command line) with the learner of ``args.output_dir``: returns
    {"contexts", "kept", "tokens", "seconds", ...}. Only the main process writes."""
    launch = launch or Launch()
    check_outputs(args)
    if args.threshold is not None and args.top_fraction is not None:
        raise IGFError("give --threshold or --top_fraction, not both")
    threshold = 0.0 if args.threshold is None else args.threshold
    if args.top_fraction is not None and not 0 < args.top_fraction <= 1:
        raise IGFError(f"--top_fraction must lie in (0, 1], got {args.top_fraction}")
    learner = load_learner(args.output_dir, args.pipeline, args.model_name_or_path, args.cache_dir,
                           args.context_len)
    # the gate of the driver (igf/pipelines.py check_learners), at the filter's boundary
    refusal = gate_refusal(learner.metrics, f"the secondary learner of {learner.source}")
    if refusal and not args.allow_weak_learner:
        raise IGFError(refusal)
    if launch.is_main:
        print(f"learner: {learner.source} ({learner.describe()}); loaded in {learner.load_seconds:.1f} s"
              + (f"\n  warning (--allow_weak_learner): {refusal}" if refusal else ""), flush=True)
    tokenizer, context_len, rows = learner.tokenizer, learner.context_len, input_rows(args)
    main, outputs, error = launch.is_main, [], None
    if main:  # an unwritable output fails before any work, on every process
        try:
            outputs.append(AtomicOutput(args.output))
            if args.scores:
                outputs.append(AtomicOutput(args.scores))
            if args.top_fraction is not None:  # every context, for the second pass
                outputs.append(AtomicOutput(args.output + ".all"))
        except IGFError as e:
            error = str(e)
    try:
        launch.agree(error)
        if main:
            kept_out = outputs[0]
            scores_out = outputs[1] if args.scores else None
            everything = outputs[-1] if args.top_fraction is not None else None
        start, n, kept, scores = time.perf_counter(), 0, 0, []
        tokenized = tokenized_chunks(rows, tokenizer, launch, args.rows_per_chunk)
        if not main:  # the other processes only tokenize their share of the rows
            for _ in tokenized:
                pass
            launch.close()  # waits for the main process to finish filtering
            return None
        with tqdm(desc="filtering", unit=" contexts", unit_scale=True) as bar:
            for contexts, origins in windows(tokenized, context_len):
                z = learner.z_scores(contexts)
                if scores_out:
                    for i, (zi, origin) in enumerate(zip(z.tolist(), origins)):
                        scores_out.write({"index": n + i, "score": zi, **origin})
                if everything:  # the second pass decides; keep what it needs
                    for ids, zi, origin in zip(contexts.tolist(), z.tolist(), origins):
                        everything.write({"input_ids": ids, "score": zi, **origin})
                    scores.append(z.numpy().astype(np.float32))
                else:
                    rows = torch.nonzero(z >= threshold).flatten().tolist()
                    kept_ids = contexts[rows].tolist()
                    for row, ids, text in zip(rows, kept_ids, tokenizer.batch_decode(kept_ids) if rows else []):
                        kept_out.write(kept_record(text, ids, z[row].item(), origins[row]))
                    kept += len(rows)
                n += len(z)
                bar.update(len(z))
                bar.set_postfix(kept=kept, refresh=False)
        if n == 0:
            where = args.input or f"{args.dataset_name} ({args.split})"
            raise IGFError(f"{where} has no context of {context_len} tokens (an empty corpus?)")
        if everything:  # second pass: exactly ceil(F n) contexts, the highest scores, ties to the earlier
            everything.close()
            scores = np.concatenate(scores)
            k = math.ceil(args.top_fraction * n - 1e-9)
            keep = np.zeros(n, dtype=bool)
            keep[np.argsort(-scores, kind="stable")[:k]] = True
            with open(everything.tmp, encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if keep[i]:
                        r = json.loads(line)
                        ids = r.pop("input_ids")
                        kept_out.write(kept_record(tokenizer.decode(ids), ids, r.pop("score"), r))
            kept = k
            everything.discard()
            outputs.remove(everything)
        commit(outputs)
        outputs = []
        launch.close()
    finally:
        for out in outputs:  # an error or an interruption: no half-written output
            out.discard()
    seconds = time.perf_counter() - start
    summary = {"contexts": n, "kept": kept, "tokens": n * context_len, "seconds": seconds,
               "tokens_per_second": n * context_len / seconds, "contexts_per_second": n / seconds,
               "learner": learner.source, "load_seconds": learner.load_seconds, "context_len": context_len}
    if args.summary:
        try:
            artifacts.write_json(args.summary, summary)
        except OSError as e:
            raise IGFError(f"cannot write {args.summary} ({e.strerror})") from None
    print(f"kept {kept:,} of {n:,} contexts ({kept / n:.1%}) of {context_len} tokens in {seconds:.1f} s "
          f"({summary['tokens_per_second']:,.0f} tokens/s); wrote {args.output}"
          + (f" and {args.scores}" if args.scores else ""), flush=True)
    return summary


def build_parser():
    from .config import ArgumentParser

    p = ArgumentParser(prog="python -m igf.filter", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Keep the contexts of new text that the secondary learner of OUTPUT_DIR "
                                   "predicts to be informative (IGF's filter, without retraining); writes JSONL.")
    p.add_argument("output_dir", help="a run_clm_igf.py output folder with a trained secondary learner, or a "
                   "learner folder (<output_dir>/learner, Learner.save_pretrained): no LM is loaded for it")
    p.add_argument("--input", help="a text file, a folder of text files, or a JSONL file (.jsonl)")
    p.add_argument("--text_field", default="text", help="the text field of a JSONL record or hub dataset row")
    p.add_argument("--dataset_name", help="a hub dataset instead of --input (streamed)")
    p.add_argument("--dataset_config_name", help="its configuration")
    p.add_argument("--split", default="train", help="its split")
    p.add_argument("--output", required=True, help="JSONL file of the kept contexts")
    p.add_argument("--threshold", type=float, help="keep contexts with z-scored predicted IG >= this (the scale of "
                   "--constant_threshold; default 0 unless --top_fraction)")
    p.add_argument("--top_fraction", type=float, help="keep exactly this fraction of the contexts, the highest "
                   "scored (instead of --threshold)")
    p.add_argument("--scores", help="also write every context's score and origin to this JSONL file")
    p.add_argument("--summary", help="also write a JSON summary: contexts, kept, tokens, seconds, tokens/s")
    p.add_argument("--pipeline", type=int, default=0, help="whose learner, with --num_pipelines > 1")
    p.add_argument("--model_name_or_path", help="the LM the learner was built on, if it has moved (checked by its "
                   "weights)")
    p.add_argument("--context_len", type=int, help="refuse unless the learner's context length is this")
    p.add_argument("--cache_dir", help="where embedded assets are (default: $IGF_CACHE_DIR, else ~/.cache/igf)")
    p.add_argument("--rows_per_chunk", type=int, default=ROWS_PER_CHUNK, help="rows (lines, records) tokenized at "
                   "once; under accelerate launch each process tokenizes every n-th chunk")
    p.add_argument("--allow_weak_learner", action=argparse.BooleanOptionalAction, default=False,
                   help="filter with a learner whose held-out Spearman is not above zero (95%% CI lower bound <= 0) "
                   "or was never measured (printed as a warning); without it the filter refuses such a learner")
    return p


def main(argv=None):
    try:
        run_filter(build_parser().parse_args(argv))
        return 0
    except IGFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output was written (rerun the command)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
