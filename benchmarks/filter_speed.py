"""How fast is the filter (igf/filter.py) against its ceiling, the tokenizer alone, and does its memory stay flat as
the corpus grows?

Applies learners built on SmolLM2-135M to the embedded books' training text (or --input), repeated to each size
(10 MB and 100 MB by default). For each size, repeat and learner it times, back to back on the same text and CPU,
each in a child process of its own (so each has its own peak memory):

  - the tokenizer alone: the filter's own input path (read the lines, tokenize them in chunks, cut the windows),
    nothing scored or written: the ceiling a filter cannot beat;
  - the filter (``python -m igf.filter``): tokens/s with tokenization, scoring and writing included, its ratio to
    the tokenizer alone, peak resident memory, the start-up (process start to the first context: imports and the
    learner's load) and, within it, the load.

The ratio is what to compare across machines and loads: another process on the CPU slows both sides (the
lookups, which read memory, somewhat more than the tokenizer). Without --output_dir the
learners are learner folders of randomly initialized ensembles of --ensembles members (1, 5 and 10 by default)
on the LM's embeddings and tokenizer, their z scale set on the corpus's contexts so that --threshold 0
keeps half of them, as a trained learner keeps about half (its weights do not change the speed). Each
--output_dir is an output folder or a learner folder (``<output_dir>/learner``, igf/learner.py: no LM loaded).
The filter runs with --allow_weak_learner: a benchmark's learner need not pass the gate.

    python benchmarks/filter_speed.py                        # ~25 min on a 2-core CPU (10 and 100 MB, twice)
    python benchmarks/filter_speed.py --sizes_mb 10 --repeats 3 --ensembles 1 5 10
    python benchmarks/filter_speed.py --output_dir output/learner --sizes_mb 10 100 1000
    python benchmarks/filter_speed.py --output_dir output/learner output/learner_distilled --sizes_mb 10

(``output/learner_distilled``: ``python -m igf.distil output --output output/learner_distilled``, one learner
trained on the ensemble's scores, named as such in the table.)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from igf import artifacts, assets  # noqa: E402
from igf.config import EMBEDDED_MODEL, ArgumentParser  # noqa: E402
from igf.data import text_files  # noqa: E402
from igf.errors import IGFError  # noqa: E402
from igf.learner import is_learner_folder, teacher_name  # noqa: E402

CONTEXT_LEN = 32  # the driver's default
SCALE_CONTEXTS = 100_000  # contexts that set a random learner's z scale (the first, of the first corpus)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", nargs="+", help="run_clm_igf.py output folders with a learner, or learner folders "
                   "(default: random learner folders of --ensembles members)")
    p.add_argument("--ensembles", type=int, nargs="+", default=[1, 5, 10], help="ensemble sizes of the random "
                   "learners (without --output_dir)")
    p.add_argument("--model_name_or_path", default=EMBEDDED_MODEL, help="the LM whose embeddings and tokenizer the "
                   "random learners are built on (without --output_dir)")
    p.add_argument("--input", help="text file or folder to repeat (default: the embedded books' training text)")
    p.add_argument("--sizes_mb", type=float, nargs="+", default=[10, 100], help="corpus sizes, in MB of text")
    p.add_argument("--repeats", type=int, default=2, help="times each size is measured (tokenizer, then every "
                   "learner), to show the spread")
    p.add_argument("--threshold", type=float, default=0.0, help="the filter's --threshold")
    p.add_argument("--work_dir", help="where the corpora and outputs go (default: a temporary folder, removed)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.repeats < 1 or min(args.ensembles) < 1:
        p.error("--repeats and --ensembles must be at least 1")
    return args


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


def corpus_contexts(corpus, tokenizer, context_len):
    """Iterator of (contexts (n, T), origins) of ``corpus``, cut as the filter cuts it (igf/contexts.py)."""
    from igf.contexts import file_rows, tokenized_chunks, windows

    rows = file_rows(corpus, "text")
    return windows(tokenized_chunks(rows, tokenizer, types.SimpleNamespace(num_processes=1, rank=0)), context_len)


def random_learners(model_name_or_path, ensembles, corpus, work):
    """Learner folders of randomly initialized ensembles (``build_learner``'s architecture defaults), one per size,
    on the LM's embeddings and tokenizer; each one's z scale is its predictions' median and SD over the corpus's
    first SCALE_CONTEXTS contexts, so that every learner keeps about half of them at z >= 0 and writes as much as
    the others. Returns their paths (``<work>/learner_<M>``)."""
    import torch

    from igf.learner import Learner
    from igf.secondary_learner import build_learner, predict

    model, tokenizer = assets.load_pretrained(assets.resolve_model_path(model_name_or_path), torch.float32)
    embeddings = model.get_input_embeddings().weight.detach()
    contexts, n = [], 0
    for c, _ in corpus_contexts(corpus, tokenizer, CONTEXT_LEN):
        contexts.append(c)
        n += len(c)
        if n >= SCALE_CONTEXTS:
            break
    contexts = torch.cat(contexts)[:SCALE_CONTEXTS]
    built_on = {"model": model_name_or_path, "weights": artifacts.weights_sha(model),
                "tokenizer": artifacts.tokenizer_sha(tokenizer)}
    folders = []
    for m in ensembles:
        torch.manual_seed(m)
        net = build_learner(embeddings, ensemble=m).eval()
        z = predict(net, contexts).double()
        config = {"context_len": CONTEXT_LEN, "scale": {"mean": z.median().item(), "std": z.std().item()},
                  "built_on": built_on, "metrics": {}}
        folders.append(Learner(net, tokenizer, config).save_pretrained(os.path.join(work, f"learner_{m}")))
    return folders


def tokenizer_alone(folder, corpus, out):
    """Write {tokens, seconds} of the filter's input path alone over ``corpus`` with the tokenizer of ``folder``'s
    learner to the JSON file ``out``: rows read, tokenized and cut into windows, nothing scored or written."""
    from igf.learner import Learner

    # a learner folder, or the run in an output folder, as the filter loads them (not timed: nor is the filter's)
    learner = Learner.from_pretrained(folder) if is_learner_folder(folder) else Learner.from_output_dir(folder)
    start, tokens = time.perf_counter(), 0
    for contexts, _ in corpus_contexts(corpus, learner.text_tokenizer, learner.context_len):
        tokens += contexts.numel()
    artifacts.write_json(out, {"tokens": tokens, "seconds": time.perf_counter() - start})


def in_child(call):
    """Run ``call`` (Python source calling a function of this file) in a child process, so that what it loads
    does not count in this process's memory, which a child's peak memory starts from."""
    code, _, _ = run_child([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import filter_speed; "
                            f"filter_speed.{call}"])
    if code != 0:
        sys.exit(f"error: {call.split('(')[0]} failed (exit {code})")


def run_child(argv):
    """(exit code, peak resident memory in bytes, wall seconds) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, time.perf_counter() - start


def spread(values, fmt):
    """'a' or 'a–b': the range of the repeats' values."""
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def render(rows):
    """The Markdown table of every learner and size: the ranges over the repeats."""
    lines = ["| learner | corpus | tokenizer alone, tokens/s | filter, tokens/s | filter / tokenizer | kept | "
             "peak memory | start-up s | of which load s |", "|---|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["learner"], r["megabytes"]) for r in rows))
    for learner, mb in keys:
        rs = [r for r in rows if (r["learner"], r["megabytes"]) == (learner, mb)]
        kind = f"{rs[0]['describe']}, folder of {rs[0]['folder_bytes'] / 1e6:.0f} MB" \
            if rs[0]["folder_bytes"] else f"{rs[0]['describe']}, output folder"
        lines.append(
            f"| {kind} | {mb:.0f} MB, {rs[0]['tokens']:,} tokens | "
            f"{spread([r['tokenizer_tokens_per_second'] for r in rs], '{:,.0f}')} | "
            f"{spread([r['tokens_per_second'] for r in rs], '{:,.0f}')} | "
            f"{spread([r['ratio'] for r in rs], '{:.2f}')} | {rs[0]['kept'] / rs[0]['contexts']:.0%} | "
            f"{spread([r['peak_rss_bytes'] / 1e9 for r in rs], '{:.2f}')} GB | "
            f"{spread([r['start_up_seconds'] for r in rs], '{:.1f}')} | "
            f"{spread([r['load_seconds'] for r in rs], '{:.2f}')} |")
    return "\n".join(lines)


def describe(folder):
    if not is_learner_folder(folder):
        return os.path.basename(os.path.normpath(folder))
    config = artifacts.read_json(os.path.join(folder, "config.json"))
    m, teacher = config["architecture"]["ensemble"], (config.get("distilled_from") or {}).get("teacher")
    if teacher:  # python -m igf.distil: one learner trained on an ensemble's scores
        return f"one learner distilled from {teacher_name(teacher)}"
    return "one learner" if m == 1 else f"ensemble of {m}"


def main(argv=None):
    args = parse_args(argv)
    books = text_files(args.input) if args.input else assets.ensure_books()["train"]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        folders = args.output_dir
        for mb in args.sizes_mb:
            corpus = os.path.join(work, f"books_{mb:g}MB.txt")
            size = make_corpus(corpus, mb, books)
            if folders is None:
                print(f"building random learner folders ({', '.join(map(str, args.ensembles))} members) ...",
                      flush=True)
                folders = [os.path.join(work, f"learner_{m}") for m in args.ensembles]
                in_child(f"random_learners({args.model_name_or_path!r}, {args.ensembles!r}, {corpus!r}, {work!r})")
            for repeat in range(args.repeats):
                for i, out in enumerate(folders):
                    # the ceiling right before each filter run: what else runs on the CPU changes by the minute
                    timing = os.path.join(work, "tokenizer.json")
                    in_child(f"tokenizer_alone({out!r}, {corpus!r}, {timing!r})")
                    timed = artifacts.read_json(timing)
                    ceiling = timed["tokens"] / timed["seconds"]
                    summary = os.path.join(work, f"summary_{mb:g}_{i}.json")
                    code, rss, wall = run_child([sys.executable, "-m", "igf.filter", out, "--input", corpus,
                                                 "--output", os.path.join(work, f"kept_{mb:g}.jsonl"),
                                                 "--threshold", str(args.threshold), "--summary", summary,
                                                 "--allow_weak_learner"])
                    if code != 0:
                        sys.exit(f"error: the filter failed on {corpus} (exit {code})")
                    s = json.load(open(summary))
                    rows.append({"learner": out, "describe": describe(out), "learner_folder": is_learner_folder(out),
                                 "megabytes": size / 1e6, "repeat": repeat, "tokens": s["tokens"],
                                 "contexts": s["contexts"], "kept": s["kept"], "seconds": s["seconds"],
                                 "tokens_per_second": s["tokens_per_second"],
                                 "contexts_per_second": s["contexts_per_second"],
                                 "tokenizer_tokens_per_second": ceiling, "ratio": s["tokens_per_second"] / ceiling,
                                 "peak_rss_bytes": rss, "start_up_seconds": wall - s["seconds"],
                                 "load_seconds": s["load_seconds"],
                                 "folder_bytes": folder_bytes(out) if is_learner_folder(out) else None})
                    print(f"{mb:g} MB, repeat {repeat + 1}, {rows[-1]['describe']}: tokenizer alone {ceiling:,.0f} "
                          f"tokens/s, filter {s['tokens_per_second']:,.0f} ({rows[-1]['ratio']:.2f})", flush=True)
            os.remove(corpus)
    print(f"\nfilter speed ({cpu_name()}, {os.cpu_count()} CPUs; threads: torch "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}; load average {os.getloadavg()[0]:.2f})")
    print(render(rows))
    if args.json:
        artifacts.write_json(args.json, rows)
    return rows


def cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
            fh.seek(0)
            amx = " with AMX" if "amx_tile" in fh.read() else ""
    except OSError:
        name, amx = None, ""
    return (name or "unknown CPU") + amx


if __name__ == "__main__":
    try:
        main()
    except IGFError as e:
        sys.exit(f"error: {e}")
