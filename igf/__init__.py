"""Information Gain Filtration (Antonello et al., ACL 2021) for causal-LM fine-tuning.

Modules, in the order the method uses them:
    data                 contexts, objective sets and test set (three disjoint sources), and each context's source
    information_gain     perplexity and IG(X) = PPL_obj(before) - PPL_obj(after one step on X)
    estimators           IG labels: exact (step, measure, restore) and first order (SGD dual form, fresh Adam)
    secondary_learner    small 1-D conv net that predicts z-scored IG from tokens
    pipelines            steps 1-3 (objective set, IG pairs, learner), once or replicated with independent seeds
    thresholds           constant and shifting acceptance thresholds
    dsir                 DSIR's hashed n-gram importance weights (the dsir control)
    selection            which candidates each method keeps: IGF, standard and the controls (random, ppl, oracle,
                         dsir, source_matched)
    finetune             fine-tuning runs on planned batches, with test-perplexity curves
    statistics           median / mean / SE, area under the curve, Welch, Mann-Whitney, paired Wilcoxon, Hedges' g,
                         within and across pipelines
    selection_report     what each method kept: sources, unigram KL, pretrained loss, overlap with IGF
    plot                 the paper's Figure 1 (with the paired difference from standard) and the report's figure
    saved_models         --save_models: run 0's model, tokenizer and model card
    contexts             new text cut into contexts as training cuts it (rows, tokens, windows), for the filter
                         and Learner.score
    filter               python -m igf.filter, the command line only: a trained learner applied to new text, kept
                         contexts as JSONL
    distillation         one learner trained on an ensemble's scores: its quality at one learner's cost
    learner              Learner: a trained learner as a shareable folder (from_pretrained / save_pretrained),
                         scoring texts and datasets rows with no LM loaded (``from igf import Learner``), distil
    distil               python -m igf.distil, the command line only: an ensemble distilled into one learner folder
    distributed          several processes under accelerate launch: sharded labels and runs, one writer
    assets               offline default: SmolLM2-135M and public-domain books from PyPI packages
    artifacts            output-directory layout, atomic writes and outputs, fingerprints and hashes, resume checks
    paths                path safety: one file under two names, a path inside a folder
    config               one dataclass per stage, presets, command-line parsing and validation
"""


def __getattr__(name):
    # ``from igf import Learner`` without importing torch for every ``import igf.<module>`` (python -m igf.assets)
    if name == "Learner":
        from .learner import Learner

        return Learner
    raise AttributeError(f"module 'igf' has no attribute {name!r}")
