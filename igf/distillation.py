"""One learner that scores like an ensemble: the filter's speed without the ensemble's cost.

An ensemble of M learners scores a context with one table lookup of width M * C per position and M heads
(igf/secondary_learner.py), so the filter slows as M grows (on a 2-core AMD EPYC with AVX2, as a share of the
tokenizer's own speed: 0.51-0.70 for ensembles of 5, 0.45-0.61 for 10, 0.64-0.93 for single learners;
docs/reference.md). Distillation trains one learner of the members' architecture to give the ensemble's scores: its
targets are the ensemble's own predictions on unlabelled contexts (as many as the text gives, not the few thousand
IG labels), standardized for the regression; the student starts from the first member's weights; its best epoch on
a held-out tenth of the contexts is kept; its last layer is then rescaled so that it predicts on the ensemble's raw
scale, and the ensemble's z scale and threshold apply to it unchanged.

Measured on two of the study's pipelines (each an ensemble of 5, distilled on its 69,677 pool contexts, scored on
its 500 held-out IG labels; docs/reference.md): the students ranked the held-out labels at Spearman 0.265 and 0.281
where their ensembles did at 0.264 and 0.281, agreed with them at 0.991 and 0.993 on contexts they were not trained
on, and kept 96-97 % of what the ensembles keep at z >= 0: the ensemble's quality at one member's cost.

``distil`` is the math; ``igf.Learner.distil`` wraps it into a learner folder with its quality measured again, and
``python -m igf.distil`` is its command line.
"""
import math

import torch

from .secondary_learner import SecondaryLearner, fit, predict, split_pairs

# the settings measured above: 8 epochs at most, the best on the held-out tenth (patience 2), Adam at 1e-3
EPOCHS, LEARNING_RATE, BATCH_SIZE, PATIENCE, VAL_FRACTION = 8, 1e-3, 256, 2, 0.1
MIN_HELD_OUT = 20  # held-out contexts at least: they pick the epoch and measure the agreement
EVAL_BATCH = 4096  # held-out contexts per forward pass (the split of a large corpus would not fit at once)


def student_of(teacher):
    """A single SecondaryLearner with the teacher's architecture and frozen inputs, starting from the weights of
    its first member (or its own, for a single learner): a warm start that already ranks like the ensemble."""
    first = teacher.members[0] if hasattr(teacher, "members") else teacher
    student = SecondaryLearner(first.embed.weight, channels=first.conv.out_channels,
                               kernel_size=first.conv.kernel_size[0], hidden=first.head[0].out_features,
                               dropout=first.head[2].p, pooling=first.pooling,
                               token_features=None if first.features is None else first.features.weight)
    student.load_state_dict(first.trainable_state(), strict=False)
    return student


@torch.no_grad()
def rescale_output(net, mean, std):
    """Make ``net`` predict mean + std * (what it predicted): its last Linear layer's weight times std, bias times
    std plus mean (exact up to float rounding; the layer is the network's last operation)."""
    last = net.head[-1]
    last.weight.mul_(std)
    last.bias.mul_(std).add_(mean)


def agreement(student_scores, teacher_scores, threshold):
    """How alike two learners score the same contexts, on the scale ``threshold`` applies to: Spearman and Pearson,
    and of the contexts the teacher keeps (score >= threshold), the fraction the student keeps too."""
    from .statistics import correlations  # scipy: only to measure a learner, so scoring starts without it

    kept_t, kept_s = teacher_scores >= threshold, student_scores >= threshold
    both = correlations(student_scores, teacher_scores)
    return {"agreement_spearman": both["spearman"], "agreement_pearson": both["pearson"],
            "kept_by_teacher": kept_t.float().mean().item(), "kept_by_student": kept_s.float().mean().item(),
            # None when the teacher keeps none of them: "0 % of nothing" would read as a disagreement
            "teacher_kept_also_kept": (kept_t & kept_s).sum().item() / kept_t.sum().item() if kept_t.any() else None}


def distil(teacher, contexts, to_scale=lambda s: s, threshold=0.0, epochs=EPOCHS, lr=LEARNING_RATE,
           batch_size=BATCH_SIZE, patience=PATIENCE, val_fraction=VAL_FRACTION, seed=0):
    """Train one learner to give ``teacher``'s scores on ``contexts`` (N, T). Returns (student in eval mode,
    report): the student predicts on the teacher's raw scale; the report says how it was trained and how it agrees
    with the teacher on the held-out contexts (``agreement``, on the scale ``to_scale`` maps raw predictions to,
    e.g. the pool's z, where ``threshold`` keeps)."""
    target = predict(teacher, contexts).double()
    mean, std = target.mean().item(), target.std().item()
    if not std > 0:
        raise ValueError("the teacher gives every context the same score: there is nothing to distil")
    z = ((target - mean) / std).float()  # a standardized regression target, whatever the teacher's scale
    generator = torch.Generator().manual_seed(seed)
    train_idx, val_idx = split_pairs(len(contexts), val_fraction, generator)
    if len(val_idx) < MIN_HELD_OUT:  # the epoch's choice and the agreement need a sample to rank
        raise ValueError(f"{len(contexts)} contexts hold out only {len(val_idx)} at a fraction of {val_fraction}: "
                         f"distilling needs at least {MIN_HELD_OUT} held out (more text, or a larger fraction)")
    # the student's layers are made (then overwritten) and dropout draws inside the fork, from the CPU generator
    # only: the caller's generators, CPU and CUDA, are where they were
    with torch.random.fork_rng(devices=[]):
        student = student_of(teacher)  # its draws stay in the fork (every weight is then overwritten)
        torch.default_generator.manual_seed(seed)  # after them: dropout's draws as they were when it was built outside
        val_mse, best_epoch = fit(student, contexts, z, train_idx, val_idx, epochs, lr, batch_size, generator,
                                  patience=patience, eval_batch_size=EVAL_BATCH)
    if not math.isfinite(val_mse):
        raise ValueError(f"training diverged (no epoch reached a finite error at learning rate {lr}): lower it")
    rescale_output(student, mean, std)
    student.eval()
    held = contexts[val_idx]
    report = {"contexts": len(contexts), "n_train": len(train_idx), "n_val": len(val_idx), "best_epoch": best_epoch,
              "val_mse": val_mse, "epochs": epochs, "learning_rate": lr, "batch_size": batch_size,
              "patience": patience, "seed": seed,
              **agreement(to_scale(predict(student, held)), to_scale(target[val_idx].float()), threshold)}
    if report["agreement_spearman"] is None:
        raise ValueError("the student gives every held-out context the same score: it learned nothing to rank by "
                         "(more text, more epochs or another learning rate)")
    return student, report
