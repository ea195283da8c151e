"""What do IG labels and IGF fine-tuning cost on this machine? One run, one table.

For each single-step optimizer (--ig_optimizer sgd, adam or both) this measures, in one process:
  - exact IG: seconds per pair, against its floor measured in the same run (one objective-set perplexity plus one
    optimizer step on one context: what any exact pair must do at least), the ratio (target <= 1.15), the
    user / system CPU time split (target: system < 10 % of user) and minor page faults per pair;
  - first-order IG: labels per second, and its Pearson / Spearman correlation with exact IG on the same contexts;
  - the allocator: exact pairs once more after mallopt(M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 2 GiB) (glibc only),
    i.e. the driver's --allocator heap: large tensors come from the heap and freed memory is kept, not returned
    to the kernel (everything else here runs with glibc's defaults, the driver's --allocator system);
and once: seconds per fine-tuning step of IGF (a secondary learner scores every candidate drawn, ~30 % kept)
against standard fine-tuning (every candidate kept), the ratio (target <= 1.15), and peak memory.

    python benchmarks/ig_speed.py                                   # SmolLM2-135M, books, CPU: a few minutes
    python benchmarks/ig_speed.py --model_name_or_path openai-community/gpt2 --json gpt2_speed.json

Timings are the machine's, under whatever else runs on it: the header prints the load average.
"""
import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from igf import allocator, assets  # noqa: E402
from igf.config import EMBEDDED_MODEL  # noqa: E402
from igf.data import build_context_sets, load_raw_splits, tokenize_splits  # noqa: E402
from igf.errors import IGFError  # noqa: E402
from igf.estimators import collect_ig_pairs, make_estimator  # noqa: E402
from igf.finetune import make_optimizer, optimizer_step  # noqa: E402
from igf.information_gain import WeightSnapshot, lm_loss, make_ig_optimizer, perplexity, reset_state  # noqa: E402
from igf.secondary_learner import SecondaryLearner, predict  # noqa: E402
from igf.selection import candidate_stream, scored, select_batch, top_fraction_threshold  # noqa: E402
from igf.statistics import correlations  # noqa: E402

DEFAULT_IG_LR = {"sgd": 1e-3, "adam": 5e-5}  # the single step's learning rate, per optimizer
TARGET_ACCEPTANCE = 0.30  # IGF keeps this share of candidates: the threshold is the 70th percentile of scores
THRESHOLD_SAMPLE = 1024  # pool contexts scored to place that threshold
SEED = 0  # which contexts are labelled, the candidate order and the learner's random init

# glibc's defaults of what --allocator heap changes (igf/allocator.py), restored after its timed pairs
GLIBC_DEFAULTS = {allocator.M_MMAP_MAX: 65536, allocator.M_TRIM_THRESHOLD: 128 * 1024}

TARGETS = {"ratio": "<= 1.15", "sys_share": "< 0.10"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=EMBEDDED_MODEL,
                   help=f"'{EMBEDDED_MODEL}' (offline SmolLM2-135M), a local model folder or a hub name")
    p.add_argument("--train_file", help="plain-text training pool (default: the embedded books)")
    p.add_argument("--validation_file", help="plain-text source of the objective set (default: the embedded books)")
    p.add_argument("--test_file", help="plain-text test text (default: the embedded books)")
    p.add_argument("--context_len", type=int, default=32, help="tokens per context")
    p.add_argument("--size_objective_set", type=int, default=32, help="contexts in the objective set")
    p.add_argument("--ig_eval_batch_size", type=int, default=8,
                   help="contexts per forward when measuring the objective set (and per first-order SGD chunk)")
    p.add_argument("--ig_optimizer", choices=("both", "sgd", "adam"), default="both",
                   help="the single step behind IG")
    p.add_argument("--ig_learning_rate", type=float,
                   help="learning rate of that step (default: sgd 1e-3, adam 5e-5)")
    p.add_argument("--num_exact", type=int, default=8, help="contexts labelled by exact IG (and its floor runs)")
    p.add_argument("--num_first_order", type=int, default=64,
                   help="contexts labelled by first-order IG; the first --num_exact are the exact ones")
    p.add_argument("--batch_size", type=int, default=8, help="contexts per fine-tuning step")
    p.add_argument("--steps", type=int, default=3, help="timed fine-tuning steps per method (after one warm-up)")
    p.add_argument("--learning_rate", type=float, default=5e-5, help="AdamW learning rate of the fine-tuning steps")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda', ...")
    p.add_argument("--json", help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    files = (args.train_file, args.validation_file, args.test_file)
    if any(files) and not all(files):
        p.error("give all three of --train_file, --validation_file, --test_file, or none")
    if not 1 <= args.num_exact <= args.num_first_order:
        p.error("need 1 <= --num_exact <= --num_first_order")
    if args.steps < 1 or args.batch_size < 1 or args.threads < 1:
        p.error("--steps, --batch_size and --threads must be >= 1")
    return args


# ----------------------------------------------------------------------------- measuring

def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Meter:
    """Wall seconds, user and system CPU seconds (all threads) and minor page faults of the code run inside
    ``with meter:``, accumulated over every entry. CUDA work is synchronized at both ends."""

    FIELDS = ("wall_s", "user_s", "sys_s", "minor_faults")

    def __init__(self, device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.total = [0.0] * len(self.FIELDS)

    @staticmethod
    def now():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt

    def __enter__(self):
        self.sync()
        self.start = self.now()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.total = [t + b - a for t, a, b in zip(self.total, self.start, self.now())]

    def per(self, n):
        """Each accumulated figure divided by ``n`` (per pair, per step, ...)."""
        return dict(zip(self.FIELDS, (t / n for t in self.total)))


def peak_rss_mib():
    """The process's peak resident memory so far, MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10


def mallopt(settings):
    """Apply glibc malloc settings {param: value}: (True, what was set), or (False, why nothing was)."""
    if not allocator.is_glibc():
        return False, f"skipped: needs Linux with glibc (this is {sys.platform})"
    done = allocator.mallopt(settings)
    return len(done) == len(settings), f"mallopt {done}" + ("" if len(done) == len(settings) else " (some refused)")


def time_exact_with_mallopt(model, opts, lrs, sets, ppl_before, rows, warmup_row, args, device):
    """Exact IG per pair (as ``time_exact``) with large blocks from the heap and no trimming: {opt: figures},
    each None when the settings could not be applied, and a note. glibc's default values are set back afterwards."""
    applied, note = mallopt(allocator.HEAP_SETTINGS)
    tuned = {opt: time_exact(model, opt, lrs[opt], sets, ppl_before, rows, warmup_row, args, device)[1]
             if applied else None for opt in opts}
    if applied:
        mallopt(GLIBC_DEFAULTS)
    return tuned, note


# ----------------------------------------------------------------------------- model and contexts

def load(args, device):
    """(model in float32 on device, context sets, parameter count)."""
    path = assets.resolve_model_path(args.model_name_or_path)
    files = ({"train": args.train_file, "validation": args.validation_file, "test": args.test_file}
             if args.train_file else assets.ensure_books())
    model, tokenizer = assets.load_pretrained(path, torch.float32)  # IG is always measured in float32
    model.to(device)
    corpus = tokenize_splits(load_raw_splits(files["train"], files["validation"], files["test"]), tokenizer)
    sets = build_context_sets(corpus, args.context_len, 1, SEED + 1)
    objective = sets.objective_set(args.size_objective_set, SEED)[0]
    return model, SimpleNamespace(train=sets.train, objective=objective), sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- IG estimators

def time_exact(model, opt, lr, sets, ppl_before, rows, warmup_row, args, device):
    """Exact IG of ``train[rows]``: (IG values, per-pair wall / user / sys seconds and minor faults).
    One warm-up pair first (optimizer state and allocator pools), not counted."""
    est = make_estimator("exact", model, opt, lr, sets.objective, ppl_before, args.ig_eval_batch_size, device)
    est(sets.train[[warmup_row]])
    meter = Meter(device)
    with meter:
        pairs = collect_ig_pairs(est, sets.train, rows, [], desc=f"exact IG ({opt})")
    return [p["ig"] for p in pairs], meter.per(len(rows))


def time_floor(model, opt, lr, sets, contexts, args, device):
    """What one exact pair cannot avoid, in seconds: one objective-set perplexity, and one step of a fresh
    ``opt`` on one context (zero_grad, loss, backward, step). Each is timed once per context; the weight restore
    and optimizer reset between steps happen outside the timed region, after one untimed warm-up step."""
    forward = Meter(device)
    with forward:
        for _ in contexts:
            perplexity(model, sets.objective, args.ig_eval_batch_size, device)
    optimizer = make_ig_optimizer(opt, model.parameters(), lr)
    snapshot = WeightSnapshot(model)
    step = Meter(device)
    model.eval()  # as the exact estimator steps: dropout off
    for i, x in enumerate(torch.cat([contexts[:1], contexts])):
        with step if i else contextlib.nullcontext():
            optimizer.zero_grad(set_to_none=False)
            lm_loss(model, x.unsqueeze(0).to(device)).backward()  # (1, T) -> scalar
            optimizer.step()
        snapshot.restore()
        reset_state(optimizer)
    n = len(contexts)
    return {"forward_s": forward.per(n)["wall_s"], "step_s": step.per(n)["wall_s"]}


def time_first_order(model, opt, lr, sets, ppl_before, rows, warmup_rows, args, device):
    """First-order IG of ``train[rows]``: (IG values, labels per second, seconds to build the estimator (the
    objective-set gradient, paid once per collection)). One warm-up chunk first, not counted."""
    setup = Meter(device)
    with setup:
        est = make_estimator("first_order", model, opt, lr, sets.objective, ppl_before, args.ig_eval_batch_size,
                             device)
    est(sets.train[warmup_rows[: est.chunk]])
    meter = Meter(device)
    with meter:
        pairs = collect_ig_pairs(est, sets.train, rows, [], desc=f"first-order IG ({opt})")
    return [p["ig"] for p in pairs], len(rows) / meter.total[0], setup.total[0]


# ----------------------------------------------------------------------------- fine-tuning steps

def time_steps(model, pool, select, args, device):
    """Seconds per fine-tuning step (candidate selection + AdamW step on the kept batch) over ``args.steps``
    steps after one untimed warm-up step, and the share of candidates kept. Weights are restored afterwards."""
    snapshot = WeightSnapshot(model)
    optimizer, scheduler = make_optimizer(model, args.learning_rate, 0.0, 0, args.steps + 1)
    meter, kept, drawn = Meter(device), 0, 0
    for i in range(args.steps + 1):
        with meter if i else contextlib.nullcontext():
            rows, n = select()
            optimizer_step(model, optimizer, scheduler, pool[rows].to(device))
        if i:
            kept, drawn = kept + len(rows), drawn + n
    snapshot.restore()
    return meter.per(args.steps)["wall_s"], kept / drawn


def time_finetuning(model, pool, args, device):
    """Standard vs IGF seconds per step at ~30 % acceptance. IGF's secondary learner scores the candidates as
    they are drawn, ``batch_size`` at a time; it is randomly initialised (only its cost matters here), and its
    threshold keeps the top 30 % of its scores on a sample of the pool."""
    torch.manual_seed(SEED)
    learner = SecondaryLearner(model.get_input_embeddings().weight)
    sample = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(SEED))[:THRESHOLD_SAMPLE]]
    threshold = top_fraction_threshold(predict(learner, sample), TARGET_ACCEPTANCE)

    def stream(score):  # the same seeded candidate order for both methods
        return scored(candidate_stream(len(pool), torch.Generator().manual_seed(SEED)), score, args.batch_size)

    standard = stream(None)
    igf = stream(lambda rows: predict(learner, pool[rows]))
    std_s, _ = time_steps(model, pool, lambda: select_batch(standard, args.batch_size, -math.inf), args, device)
    igf_s, acceptance = time_steps(model, pool, lambda: select_batch(igf, args.batch_size, threshold), args, device)
    return {"standard_s_per_step": std_s, "igf_s_per_step": igf_s, "igf_ratio": igf_s / std_s,
            "igf_acceptance": acceptance}


# ----------------------------------------------------------------------------- the table

def ig_rows(opt, exact, floor, first_order):
    """Rows (key, metric, unit, value, target) of one IG optimizer."""
    fl = floor["forward_s"] + floor["step_s"]
    fo, corr = first_order
    return [
        (f"{opt}.exact_s_per_pair", f"exact IG ({opt}), glibc default", "s/pair", exact["wall_s"], ""),
        (f"{opt}.floor_forward_s", f"floor ({opt}): objective-set perplexity", "s", floor["forward_s"], ""),
        (f"{opt}.floor_step_s", f"floor ({opt}): one step on one context", "s", floor["step_s"], ""),
        (f"{opt}.floor_s", f"floor ({opt}): forward + step", "s/pair", fl, ""),
        (f"{opt}.exact_over_floor", f"exact IG ({opt}) / floor", "ratio", exact["wall_s"] / fl, TARGETS["ratio"]),
        (f"{opt}.exact_user_s", f"exact IG ({opt}), glibc default: user CPU", "s/pair", exact["user_s"], ""),
        (f"{opt}.exact_sys_s", f"exact IG ({opt}), glibc default: system CPU", "s/pair", exact["sys_s"], ""),
        (f"{opt}.exact_sys_share", f"exact IG ({opt}), glibc default: system / user", "ratio",
         exact["sys_s"] / exact["user_s"] if exact["user_s"] > 0 else None, TARGETS["sys_share"]),
        (f"{opt}.exact_minor_faults", f"exact IG ({opt}), glibc default: minor page faults", "faults/pair",
         exact["minor_faults"], ""),
        (f"{opt}.exact_labels_per_s", f"exact IG ({opt})", "labels/s", 1 / exact["wall_s"], ""),
        (f"{opt}.first_order_labels_per_s", f"first-order IG ({opt})", "labels/s", fo["labels_per_s"], ""),
        (f"{opt}.first_order_setup_s", f"first-order IG ({opt}): objective gradient, once", "s", fo["setup_s"], ""),
        (f"{opt}.first_order_pearson", f"first-order vs exact IG ({opt}): Pearson", "r", corr["pearson"], ""),
        (f"{opt}.first_order_spearman", f"first-order vs exact IG ({opt}): Spearman", "rho", corr["spearman"], ""),
    ]


def allocator_rows(opt, default, tuned):
    """Exact IG after mallopt, against the glibc-default rows of ``ig_rows`` (``tuned`` is None when skipped)."""
    m, label = tuned or {}, "mallopt: no mmap/trim"

    def ratio(field):
        return m[field] / default[field] if m and default[field] > 0 else None

    return [(f"{opt}.mallopt.exact_s_per_pair", f"exact IG ({opt}), {label}", "s/pair", m.get("wall_s"), ""),
            (f"{opt}.mallopt.exact_sys_s", f"exact IG ({opt}), {label}: system CPU", "s/pair", m.get("sys_s"), ""),
            (f"{opt}.mallopt.exact_minor_faults", f"exact IG ({opt}), {label}: minor page faults", "faults/pair",
             m.get("minor_faults"), ""),
            (f"{opt}.mallopt_over_default", f"exact IG ({opt}): mallopt / glibc default, time", "ratio",
             ratio("wall_s"), ""),
            (f"{opt}.mallopt_over_default_sys", f"exact IG ({opt}): mallopt / glibc default, system CPU", "ratio",
             ratio("sys_s"), "")]


def finetune_rows(ft, batch_size, peak_mib):
    return [
        ("standard_s_per_step", f"standard fine-tuning step ({batch_size} contexts)", "s/step",
         ft["standard_s_per_step"], ""),
        ("igf_s_per_step", f"IGF fine-tuning step ({batch_size} kept, learner scores every candidate)", "s/step",
         ft["igf_s_per_step"], ""),
        ("igf_acceptance", "IGF: candidates kept", "share", ft["igf_acceptance"], f"~ {TARGET_ACCEPTANCE:.2f}"),
        ("igf_over_standard", "IGF / standard", "ratio", ft["igf_ratio"], TARGETS["ratio"]),
        ("peak_rss_mib", "peak memory (max RSS of the process)", "MiB", peak_mib, ""),
    ]


def fmt(value):
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def render(rows):
    lines = ["| metric | unit | value | target |", "|---|---|---|---|"]
    lines += [f"| {metric} | {unit} | {fmt(value)} | {target} |" for _, metric, unit, value, target in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    started, load_avg = time.perf_counter(), os.getloadavg()
    model, sets, n_params = load(args, device)
    opts = ("sgd", "adam") if args.ig_optimizer == "both" else (args.ig_optimizer,)
    lrs = {o: args.ig_learning_rate or DEFAULT_IG_LR[o] for o in opts}
    order = torch.randperm(len(sets.train), generator=torch.Generator().manual_seed(SEED))
    warmup = order[-args.ig_eval_batch_size:]  # from the far end: never one of the measured contexts
    if len(sets.train) < args.num_first_order + len(warmup):
        raise IGFError(f"the training pool has {len(sets.train)} contexts; --num_first_order {args.num_first_order} "
                       f"needs {args.num_first_order + len(warmup)}")
    rows_fo, rows_exact = order[: args.num_first_order], order[: args.num_exact]
    ppl_before = perplexity(model, sets.objective, args.ig_eval_batch_size, device)

    figures, exact_ig = {}, {}
    for opt in opts:  # 2) information gain: exact, its floor, first order
        exact_ig[opt], exact = time_exact(model, opt, lrs[opt], sets, ppl_before, rows_exact, int(warmup[0]), args,
                                          device)
        floor = time_floor(model, opt, lrs[opt], sets, sets.train[rows_exact], args, device)
        fo_ig, labels_per_s, setup_s = time_first_order(model, opt, lrs[opt], sets, ppl_before, rows_fo, warmup,
                                                        args, device)
        corr = correlations(fo_ig[: args.num_exact], exact_ig[opt])
        figures[opt] = {"exact": exact, "floor": floor,
                        "first_order": ({"labels_per_s": labels_per_s, "setup_s": setup_s}, corr)}
    ft = time_finetuning(model, sets.train, args, device)  # 4) fine-tuning steps, before the allocator changes

    tuned, note = time_exact_with_mallopt(model, opts, lrs, sets, ppl_before, rows_exact, int(warmup[0]), args,
                                          device)  # last: the allocator's dynamic threshold does not come back

    rows = []
    for opt in opts:
        rows += ig_rows(opt, figures[opt]["exact"], figures[opt]["floor"], figures[opt]["first_order"])
        rows += allocator_rows(opt, figures[opt]["exact"], tuned[opt])
    rows += finetune_rows(ft, args.batch_size, peak_rss_mib())
    if device.type == "cuda":
        rows.append(("cuda_peak_mib", "peak CUDA memory allocated", "MiB", torch.cuda.max_memory_allocated(device)
                     / 2 ** 20, ""))
    wall = time.perf_counter() - started
    header = (f"model {args.model_name_or_path} ({n_params:,} parameters) | device {device} | threads "
              f"{torch.get_num_threads()} | torch {torch.__version__} | load average at start "
              f"{' '.join(f'{v:.2f}' for v in load_avg)}")
    print(f"\n{header}\n\n{render(rows)}\n\nallocator: {note}\nwall time {wall:.0f} s", flush=True)
    if args.json:
        out = {"header": header, "args": vars(args), "allocator": note, "wall_s": wall, "ig_learning_rate": lrs,
               "figures": {key: value for key, _, _, value, _ in rows},
               "rows": [dict(zip(("key", "metric", "unit", "value", "target"), r)) for r in rows]}
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return rows


if __name__ == "__main__":
    try:
        main()
    except IGFError as e:
        sys.exit(f"error: {e}")
