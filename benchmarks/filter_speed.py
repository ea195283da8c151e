"""How fast is the filter (igf/filter.py), tokenization included, and does its memory stay flat as the corpus grows?

Applies a secondary learner built on SmolLM2-135M to the embedded books' training text (or --input), repeated to
each size (10 MB and 100 MB by default), one child process per size so each has its own peak memory, and prints
tokens/s, contexts/s and peak resident memory. Without --output_dir it first trains a small learner with the driver
(64 first-order IG labels, --stages ig_pairs learner): its weights do not change the speed.

    python benchmarks/filter_speed.py                       # ~3 min on a 2-core CPU
    python benchmarks/filter_speed.py --output_dir output --sizes_mb 10 100 1000
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

SMALL_LEARNER = ["--num_ig_pairs", "64", "--num_validation_pairs", "0", "--learner_epochs", "5",
                 "--stages", "ig_pairs", "learner"]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", help="a run_clm_igf.py output folder with a learner (default: train a small one)")
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


def run_child(argv):
    """(exit code, peak resident memory in bytes, wall seconds) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        out = args.output_dir
        if out is None:
            out = os.path.join(work, "learner")
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
            summary = os.path.join(work, f"summary_{mb:g}.json")
            code, rss, wall = run_child([sys.executable, "-m", "igf.filter", out, "--input", corpus, "--output",
                                         os.path.join(work, f"kept_{mb:g}.jsonl"), "--threshold", str(args.threshold),
                                         "--summary", summary])
            if code != 0:
                sys.exit(f"error: the filter failed on {corpus} (exit {code})")
            s = json.load(open(summary))
            rows.append({"megabytes": size / 1e6, "tokens": s["tokens"], "contexts": s["contexts"], "kept": s["kept"],
                         "seconds": s["seconds"], "tokens_per_second": s["tokens_per_second"],
                         "contexts_per_second": s["contexts_per_second"], "peak_rss_bytes": rss,
                         "start_up_seconds": wall - s["seconds"]})
            os.remove(corpus)
    print(f"\nfilter speed (threads: torch {os.environ.get('OMP_NUM_THREADS', 'default')}, load average "
          f"{os.getloadavg()[0]:.2f})")
    print("| corpus | tokens | contexts | kept | filtering s | tokens/s | contexts/s | peak memory | start-up s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['megabytes']:.0f} MB | {r['tokens']:,} | {r['contexts']:,} | {r['kept']:,} | {r['seconds']:.1f} | "
              f"{r['tokens_per_second']:,.0f} | {r['contexts_per_second']:,.0f} | {r['peak_rss_bytes'] / 1e9:.2f} GB | "
              f"{r['start_up_seconds']:.1f} |")
    if args.json:
        artifacts.write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    try:
        main()
    except IGFError as e:
        sys.exit(f"error: {e}")
