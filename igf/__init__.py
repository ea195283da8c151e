"""Information Gain Filtration (Antonello et al., ACL 2021) for causal-LM fine-tuning.

Modules, in the order the method uses them:
    data                 contexts, objective set and test set (three disjoint sources)
    information_gain     perplexity and IG(X) = PPL_obj(before) - PPL_obj(after one step on X)
    estimators           IG labels: exact (step, measure, restore) and first order (SGD dual form, fresh Adam)
    secondary_learner    small 1-D conv net that predicts z-scored IG from tokens
    thresholds           constant and shifting acceptance thresholds
    selection            which candidates each method keeps: IGF, standard and the controls (random, ppl, oracle)
    finetune             fine-tuning runs on planned batches, with test-perplexity curves
    statistics           median / mean / SE, area under the curve, Welch, Mann-Whitney, paired Wilcoxon, Hedges' g
    plot                 the paper's Figure 1 from saved results
    distributed          several processes under accelerate launch: sharded labels and runs, one writer
    assets               offline default: SmolLM2-135M and public-domain books from PyPI packages
    artifacts            output-directory layout, atomic writes, resume checks
    config               one dataclass per stage, presets, command-line parsing and validation
"""
