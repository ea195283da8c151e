"""Information Gain Filtration (Antonello et al., ACL 2021) for causal-LM fine-tuning.

Modules, in the order the method uses them:
    data                 contexts, objective set and test set (three disjoint sources)
    information_gain     perplexity and IG(X) = PPL_obj(before) - PPL_obj(after one step on X)
    secondary_learner    small 1-D conv net that predicts z-scored IG from tokens
    thresholds           constant and shifting acceptance thresholds
    finetune             standard and IGF fine-tuning runs, with test-perplexity curves
    statistics           mean / SE / median, area under the curve, Welch t-tests
    plot                 the paper's Figure 1 from saved results
    assets               offline default: SmolLM2-135M and public-domain books from PyPI packages
    artifacts            output-directory layout, atomic writes, resume checks
    config               one dataclass per stage, presets, command-line parsing and validation
"""
