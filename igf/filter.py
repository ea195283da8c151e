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
and standard deviation recorded in the learner file (``thresholds.standardize``); a learner whose run selected on
raw predictions (--no-standardize_scores, recorded in its folder) scores raw predictions, as IGF did.
``--threshold Z`` keeps contexts with z >= Z, so filtering the training text at 0 keeps exactly the pool contexts
that igf_constant at --constant_threshold 0 accepts.
``--top_fraction F`` keeps exactly ceil(F * n) contexts, the highest scored (ties: the earlier in the input), in
two passes over the scores: every context is first written to a temporary file beside the output.

Output: JSON lines with the context's text, token ids, score and origin (file and 1-based line of its first token,
or dataset row), readable with ``datasets.load_dataset("json", data_files=...)``; ``--scores`` also writes every
context's score and origin. ``text`` is the decoded window (a window cut inside a multi-byte character decodes to
U+FFFD there); ``input_ids`` are exact. Outputs that would overwrite a file the command reads (the input, the
learner folder's files, the output folder's artifacts, the LM's files; through symlinks and hard links), each
other, or lie inside the input folder are refused before any work. Outputs are written to temporary files beside
them (with the umask's permissions), fsynced and renamed all or none when complete (``artifacts.commit``), so an
interrupted or failed run leaves no half-written output and keeps the previous ones (rerun the command to start
again). Memory does not grow with the
corpus (``--top_fraction`` keeps 4 bytes per context for its second pass).

Under ``accelerate launch`` the input's rows are dealt out in chunks (chunk i of every round to process i, which
tokenizes it); the main process gathers the tokens in input order, scores and writes the one output.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import orjson
import torch
from tqdm.auto import tqdm

from . import artifacts
from .artifacts import AtomicOutput, commit
from .contexts import ROWS_PER_CHUNK, dataset_rows, decode_windows, file_rows, tokenized_chunks, windows
from .distributed import Launch
from .errors import IGFError
from .learner import Learner, is_learner_folder
from .paths import same_path, touches


def load_learner(args):
    """The ``Learner`` the command line names: a learner folder, or the run in an output folder."""
    learner = Learner.from_path(args.output_dir, args.pipeline, args.model_name_or_path, args.cache_dir)
    if args.context_len is not None and args.context_len != learner.context_len:
        raise IGFError(f"the learner in {learner.source} was built on contexts of {learner.context_len} tokens, "
                       f"not --context_len {args.context_len}")
    return learner


def input_rows(args):
    """Iterator of (text, origin dict): the rows training would tokenize one by one."""
    if args.dataset_name:
        return dataset_rows(args.dataset_name, args.dataset_config_name, args.split, args.text_field)
    if args.input is None:
        raise IGFError("give --input (a text file, a folder of text files or a JSONL file) or --dataset_name")
    return file_rows(args.input, args.text_field)


def outputs_of(args):
    return [(flag, path) for flag, path in (("--output", args.output), ("--scores", args.scores),
                                            ("--summary", args.summary)) if path]


def check_outputs(args):
    """Refuse, before any work, an output that would replace the input or another output, that lies inside the
    input folder (the next run would read it as input), or that is a file the learner is loaded from: a learner
    folder's files, an output folder's artifacts (its learner file and folder, its runs, its config.json)."""
    outputs = outputs_of(args)
    folder = args.output_dir
    learner_folder = os.path.isdir(folder) and is_learner_folder(folder)
    for i, (flag, path) in enumerate(outputs):
        for other_flag, other in outputs[:i]:
            if same_path(path, other):
                raise IGFError(f"{flag} {path} is the same file as {other_flag} {other}; give two paths")
        if args.input and os.path.isdir(args.input) and touches(path, args.input):
            raise IGFError(f"{flag} {path} lies inside the --input folder {args.input} (or is another name of one of "
                           "its files; the next run would read it as input); write it elsewhere")
        if args.input and same_path(path, args.input):
            raise IGFError(f"{flag} {path} is the --input file; write it elsewhere")
        if learner_folder and touches(path, folder):
            raise IGFError(f"{flag} {path} lies inside the learner folder {folder} (it would replace or add to "
                           "the learner's files); write it elsewhere")
        if not learner_folder and os.path.isdir(folder):
            name = artifacts.touched_artifact(path, folder, args.pipeline)
            if name:
                raise IGFError(f"{flag} {path} is the output folder's artifact {name} (the run's own record); "
                               "write it elsewhere")


def check_read_files(args, learner):
    """Refuse an output that is a file the learner was loaded from (its LM's folder, when loaded on it)."""
    for flag, path in outputs_of(args):
        for read in learner.files:
            if touches(path, read):
                raise IGFError(f"{flag} {path} is (or lies inside) {read}, which the learner was loaded from; "
                               "write it elsewhere")


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
    learner = load_learner(args)
    check_read_files(args, learner)
    # the gate of the driver (igf/pipelines.py check_learners), at the filter's boundary
    refusal = learner.gate_refusal()
    if refusal and not args.allow_weak_learner:
        raise IGFError(refusal)
    if launch.is_main:
        print(f"learner: {learner.source} ({learner.describe()}); loaded in {learner.load_seconds:.1f} s"
              + (f"\n  warning (--allow_weak_learner): {refusal}" if refusal else ""), flush=True)
    tokenizer, context_len, rows = learner.text_tokenizer, learner.context_len, input_rows(args)
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
                    for row, ids, text, zi in zip(rows, kept_ids, decode_windows(kept_ids, tokenizer) if rows else [],
                                                  z[rows].tolist()):
                        kept_out.write(kept_record(text, ids, zi, origins[row]))
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
            with open(everything.tmp, "rb") as fh:
                for i, line in enumerate(fh):
                    if keep[i]:
                        r = orjson.loads(line)
                        ids = r.pop("input_ids")
                        kept_out.write(kept_record(decode_windows([ids], tokenizer)[0], ids, r.pop("score"), r))
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
