"""Distil a learner ensemble into one learner (igf/distillation.py, ``igf.Learner.distil``): the ensemble's scores
at one learner's cost in the filter.

    python -m igf.distil output --output output/learner_distilled          # the run's learner, on its own pool
    python -m igf.distil output/learner --input corpus/ --output fast/     # a learner folder, on your text
    python -m igf.filter output/learner_distilled --input new_text/ --output kept.jsonl

From an output folder (without --input), the student trains on the run's training pool (the text its config.json
names, cut as the filter cuts it) and is measured on the run's held-out IG labels as the driver measures a learner,
so the gate applies to it as to any learner. On other text (--input, or from a learner folder, which carries no
labels) its held-out quality is not measured, and the filter refuses it unless --allow_weak_learner. Either way its
agreement with the teacher (Spearman, and the share of the teacher's kept contexts it keeps) is measured on a tenth
of the contexts it was not trained on, printed, and written in its folder's config.json and card.

--output is written by ``Learner.save_pretrained``: a new or empty folder, or a learner folder holding nothing
else. It may not be the source, a file or folder the learner was loaded from, an artifact of the source run, or lie
inside the --input folder or among the run's training text; each is refused in one line before any training.
--max_contexts takes the first contexts of --input or --dataset_name (all of them are held in memory, 256 bytes
each), or a seeded sample of the run's pool (whose held-out labels are checked against the whole pool).
"""
import argparse
import os
import sys
import time

import torch

from . import artifacts, distillation
from .artifacts import replaceable
from .contexts import dataset_rows, file_rows, text_rows
from .errors import IGFError
from .learner import Learner, is_learner_folder, is_replaceable_folder, run_files, run_heldout_labels
from .paths import same_path, touches


def check_output(args):
    """Refuse, before any work, an --output that would replace what this command reads or the user's files."""
    out, source = args.output, args.source
    if not out.strip():
        raise IGFError("--output is empty: give the learner folder to write")
    if same_path(out, source) or (os.path.isdir(source) and is_learner_folder(source) and touches(out, source)):
        raise IGFError(f"--output {out} is (or lies inside) the learner folder {source} it distils; write it "
                       "elsewhere")
    # the source run's artifacts, and any other run's around --output (e.g. another pipeline's learner folder)
    runs = [source] if os.path.isdir(source) and not is_learner_folder(source) else []
    for folder in runs + list(artifacts.output_dirs_around(out)):
        name = artifacts.touched_artifact(out, folder, args.pipeline)
        if name:
            raise IGFError(f"--output {out} is the artifact {name} of the output folder {folder} (a run's own "
                           "record); write it elsewhere")
    if args.input and touches(out, args.input):
        raise IGFError(f"--output {out} is (or lies inside) the --input {args.input}; write it elsewhere")
    for split, root in run_text_roots(args).items():
        if touches(out, root):
            raise IGFError(f"--output {out} is (or lies among) the source run's {split} text ({root}), which a run "
                           "reads as text; write it elsewhere")
    why = replaceable(out, is_replaceable_folder)
    if why:
        raise IGFError(f"will not save the learner to {out}: {why}; give a new or empty folder")


def source_run_files(args):
    """{split: files} of the source run's text (an output folder that read text files), else {}."""
    if not os.path.isdir(args.source) or is_learner_folder(args.source):
        return {}
    return {split: files for split, files in (run_files(args.source, args.cache_dir) or {}).items() if files}


def run_text_roots(args):
    """{split: the file or folder the source run read it from}: its --train_file, --validation_file, --test_file,
    or for the embedded books the folder of the split's works."""
    files = source_run_files(args)
    data = artifacts.read_json(os.path.join(args.source, artifacts.CONFIG))["data"] if files else {}
    return {split: data.get(f"{split}_file") or os.path.commonpath([os.path.dirname(n) for n in names])
            for split, names in files.items()}


def training_files(args):
    """The source run's training files, when the student is distilled on its pool (an output folder, no --input or
    --dataset_name), else None."""
    if args.input or args.dataset_name:
        return None
    return source_run_files(args).get("train")


def training_text(args, learner):
    """(contexts (N, T), what they are, held-out labels or None, why there are none): --input or --dataset_name
    (their first --max_contexts contexts), else the source run's own training pool (a seeded sample of
    --max_contexts of it) with the run's held-out labels, checked against the pool they were measured on."""
    files = training_files(args)
    if args.dataset_name:
        rows, where = dataset_rows(args.dataset_name, args.dataset_config_name, args.split, args.text_field), \
            f"{args.dataset_name} ({args.split})"
    elif args.input:
        rows, where = file_rows(args.input, args.text_field), os.path.basename(os.path.normpath(args.input))
    elif files is not None:
        rows, where = text_rows(files), "the run's training pool"  # read as the driver read them: lines
    else:
        raise IGFError(f"{args.source} names no training text this command can read (a learner folder, or a run on "
                       "a hub dataset): give --input or --dataset_name")
    cut, limit = [], None if files is not None else args.max_contexts  # the whole pool: its hash names the labels
    for contexts, _ in learner.contexts(rows):
        cut.append(contexts)
        if limit and sum(len(c) for c in cut) >= limit:
            break
    contexts = torch.cat(cut)[:limit] if cut else torch.zeros(0, learner.context_len, dtype=torch.long)
    heldout, why = None, "a learner folder holds no held-out labels"
    if not is_learner_folder(args.source):
        heldout = run_heldout_labels(args.source, args.pipeline, contexts)
        why = "the run's held-out labels were measured on another pool than this text"
    if files is not None and args.max_contexts and args.max_contexts < len(contexts):
        sample = torch.randperm(len(contexts), generator=torch.Generator().manual_seed(args.seed))
        contexts = contexts[sample[: args.max_contexts].sort().values]
        where = f"a sample of the run's training pool (seed {args.seed})"
    return contexts, where, heldout, why


def run_distil(args):
    """Distil the learner of ``args.source`` (the parsed command line) into ``args.output``; returns the student."""
    check_output(args)
    learner = Learner.from_path(args.source, args.pipeline, args.model_name_or_path, args.cache_dir)
    for read in learner.files:
        if touches(args.output, read):
            raise IGFError(f"--output {args.output} is (or lies inside) {read}, which the learner was loaded from; "
                           "write it elsewhere")
    print(f"teacher: {learner.source} ({learner.describe()})", flush=True)
    contexts, where, heldout, why = training_text(args, learner)
    if len(contexts) < 2:
        raise IGFError(f"{where} has fewer than 2 contexts of {learner.context_len} tokens: nothing to distil on")
    print(f"distilling on {len(contexts):,} contexts of {where}"
          + ("; measured on the run's held-out labels" if heldout else
             f"; held-out quality not measured ({why})"), flush=True)
    start = time.perf_counter()
    student = learner.distil(contexts, heldout=heldout, description=where, epochs=args.epochs, lr=args.learning_rate,
                             batch_size=args.batch_size, patience=args.patience, val_fraction=args.val_fraction,
                             seed=args.seed)
    d, kept = student.config["distilled_from"], student.config["distilled_from"]["teacher_kept_also_kept"]
    print(f"student: one learner, {student.quality}; on the {d['n_val']:,} contexts held out of its training it "
          f"ranks like the teacher at Spearman {d['agreement_spearman']:.3f}"
          + (f" and keeps {kept:.1%} of what the teacher keeps" if kept is not None else "")
          + f" ({d['kept_by_student']:.1%} against {d['kept_by_teacher']:.1%} kept); best epoch {d['best_epoch']} of "
          f"{d['epochs']}, {time.perf_counter() - start:.0f} s", flush=True)
    student.save_pretrained(args.output)
    print(f"wrote {args.output}: python -m igf.filter {args.output} --input ... --output kept.jsonl", flush=True)
    return student


def build_parser():
    from .config import ArgumentParser

    p = ArgumentParser(prog="python -m igf.distil", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train one learner to give the scores of a learner ensemble (an output folder's "
                                   "or a learner folder's), so that the filter runs at one learner's cost; writes a "
                                   "learner folder with its agreement and, from an output folder, its held-out "
                                   "quality.")
    p.add_argument("source", help="a run_clm_igf.py output folder with a trained learner, or a learner folder")
    p.add_argument("--output", required=True, help="the learner folder to write (new, empty, or a learner folder)")
    p.add_argument("--input", help="text to distil on: a text file, a folder of text files or a JSONL file "
                   "(default, for an output folder: the run's training pool, measured on its held-out labels)")
    p.add_argument("--text_field", default="text", help="the text field of a JSONL record or hub dataset row")
    p.add_argument("--dataset_name", help="a hub dataset to distil on instead of --input (streamed)")
    p.add_argument("--dataset_config_name", help="its configuration")
    p.add_argument("--split", default="train", help="its split")
    p.add_argument("--max_contexts", type=int, help="distil on this many contexts (default: all): the first of "
                   "--input or --dataset_name, a seeded sample of a run's pool")
    p.add_argument("--pipeline", type=int, default=0, help="whose learner, with --num_pipelines > 1")
    p.add_argument("--model_name_or_path", help="the LM an output folder's learner was built on, if it has moved")
    p.add_argument("--cache_dir", help="where embedded assets are (default: $IGF_CACHE_DIR, else ~/.cache/igf)")
    p.add_argument("--epochs", type=int, default=distillation.EPOCHS, help="training epochs at most")
    p.add_argument("--learning_rate", type=float, default=distillation.LEARNING_RATE, help="Adam's learning rate")
    p.add_argument("--batch_size", type=int, default=distillation.BATCH_SIZE, help="contexts per step")
    p.add_argument("--patience", type=int, default=distillation.PATIENCE, help="stop after this many epochs "
                   "without a lower held-out error (the best epoch is kept)")
    p.add_argument("--val_fraction", type=float, default=distillation.VAL_FRACTION, help="share of the contexts "
                   "held out to pick the epoch and measure the agreement")
    p.add_argument("--seed", type=int, default=0, help="the split's, the order's and dropout's seed")
    return p


def check_args(args):
    for flag in ("epochs", "batch_size", "max_contexts"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise IGFError(f"--{flag} must be a positive integer, got {value}")
    if args.patience < 1:
        raise IGFError(f"--patience must be a positive integer, got {args.patience}")
    if not args.learning_rate > 0:
        raise IGFError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if not 0 < args.val_fraction < 1:
        raise IGFError(f"--val_fraction must lie in (0, 1), got {args.val_fraction}")
    if args.input and args.dataset_name:
        raise IGFError("give --input or --dataset_name, not both")
    if not args.dataset_name and (args.dataset_config_name or args.split != "train"):
        raise IGFError("--dataset_config_name and --split apply to --dataset_name only")
    jsonl = args.input and os.path.isfile(args.input) and args.input.endswith((".jsonl", ".json"))
    if args.text_field != "text" and not (jsonl or args.dataset_name):
        raise IGFError("--text_field applies to a JSONL --input or to --dataset_name only")
    if args.pipeline != 0 and os.path.isdir(args.source) and is_learner_folder(args.source):
        raise IGFError(f"{args.source} is a learner folder (one learner): --pipeline applies to an output folder")


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        check_args(args)
        run_distil(args)
        return 0
    except IGFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written (rerun the command)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
