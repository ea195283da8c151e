"""How fast is the filter (igf/filter.py), tokenization included, and does its memory stay flat as the corpus grows?

Applies a secondary learner built on SmolLM2-135M to the embedded books' training text (or --input), repeated to
each size (10 MB and 100 MB by default), one child process per size so each has its own peak memory, and prints
tokens/s, contexts/s, peak resident memory, the start-up time (process start to the first context: imports and
the learner's load) and, within it, the learner's load. Without --output_dir it first trains a small learner with
the driver (64 first-order IG labels, --stages ig_pairs learner): its weights do not change the speed. Each
--output_dir is an output folder or a learner folder (``<output_dir>/learner``, igf/learner.py: no LM loaded).
The filter runs with --allow_weak_learner: a benchmark's learner need not pass the gate.

    python benchmarks/filter_speed.py                       # ~3 min on a 2-core CPU
    python benchmarks/filter_speed.py --output_dir output --sizes_mb 10 100 1000
    python benchmarks/filter_speed.py --output_dir output output/learner --sizes_mb 10   # both doors, side by side
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from igf import artifacts, assets  # noqa: E402
from igf.config import ArgumentParser  # noqa: E402
from igf.data import text_files  # noqa: E402
from igf.errors import IGFError  # noqa: E402
from igf.learner import is_learner_folder  # noqa: E402

SMALL_LEARNER = ["--num_ig_pairs", "64", "--num_validation_pairs", "0", "--learner_epochs", "5",
                 "--stages", "ig_pairs", "learner"]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", nargs="+", help="run_clm_igf.py output folders with a learner, or learner folders "
                   "(default: train a small one)")
    p.add_argument("--input", help="text file or folder to repeat (default: the embedded books' training text)")
    p.add_argument("--sizes_mb", type=float, nargs="+", default=[10, 100], help="corpus sizes, in MB of text")
    p.add_argument("--threshold", type=float, default=0.0, help="the filter's --threshold")
    p.add_argument("--work_dir", help="where the corpora and outputs go (default: a temporary folder, removed)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p.parse_args(argv)


def make_corpus(path, megabytes, books):
    """The books' training text repeated (whole works, in order) until the file holds ``megabytes`` MB."""
    target, written = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            for file, _ in books:
                text = open(file, encoding="utf-8").read()
                out.write(text)
                written += len(text.encode())
                if written >= target:
                    break
    return written


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def run_child(argv):
    """(exit code, peak resident memory in bytes, wall seconds) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        folders = args.output_dir
        if folders is None:
            out = os.path.join(work, "learner")
            folders = [out]
            print("training a small learner on SmolLM2-135M (64 first-order labels) ...", flush=True)
            code, _, sec = run_child([sys.executable, "run_clm_igf.py", "--output_dir", out, *SMALL_LEARNER])
            if code != 0:
                sys.exit(f"error: training the learner failed (exit {code})")
            print(f"  {sec:.0f} s", flush=True)
        books = text_files(args.input) if args.input else assets.ensure_books()["train"]
        rows = []
        for mb in args.sizes_mb:
            corpus = os.path.join(work, f"books_{mb:g}MB.txt")
            size = make_corpus(corpus, mb, books)
            for i, out in enumerate(folders):
                summary = os.path.join(work, f"summary_{mb:g}_{i}.json")
                code, rss, wall = run_child([sys.executable, "-m", "igf.filter", out, "--input", corpus, "--output",
                                             os.path.join(work, f"kept_{mb:g}.jsonl"), "--threshold",
                                             str(args.threshold), "--summary", summary, "--allow_weak_learner"])
                if code != 0:
                    sys.exit(f"error: the filter failed on {corpus} (exit {code})")
                s = json.load(open(summary))
                rows.append({"learner": out, "learner_folder": is_learner_folder(out), "megabytes": size / 1e6,
                             "tokens": s["tokens"], "contexts": s["contexts"], "kept": s["kept"],
                             "seconds": s["seconds"], "tokens_per_second": s["tokens_per_second"],
                             "contexts_per_second": s["contexts_per_second"], "peak_rss_bytes": rss,
                             "start_up_seconds": wall - s["seconds"], "load_seconds": s["load_seconds"],
                             "folder_bytes": folder_bytes(out) if is_learner_folder(out) else None})
            os.remove(corpus)
    print(f"\nfilter speed (threads: torch {os.environ.get('OMP_NUM_THREADS', 'default')}, load average "
          f"{os.getloadavg()[0]:.2f})")
    print("| learner | corpus | tokens | contexts | kept | filtering s | tokens/s | contexts/s | peak memory | "
          "start-up s | of which load s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kind = f"folder ({r['folder_bytes'] / 1e6:.0f} MB)" if r["learner_folder"] else "output folder"
        print(f"| {r['learner']} {kind} | {r['megabytes']:.0f} MB | {r['tokens']:,} | {r['contexts']:,} | "
              f"{r['kept']:,} | {r['seconds']:.1f} | {r['tokens_per_second']:,.0f} | {r['contexts_per_second']:,.0f} | "
              f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {r['start_up_seconds']:.1f} | {r['load_seconds']:.1f} |")
    if args.json:
        artifacts.write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    try:
        main()
    except IGFError as e:
        sys.exit(f"error: {e}")
