"""Acceptance thresholds on the predicted z-scored IG, as a function of the batch being filled (0-based), and the z
scale they are on (``standardize``; pure functions, no import beyond the standard library's, so that the filter
and ``igf.Learner`` start without the fine-tuning stack).

A candidate context is kept when predicted_z >= threshold(batch). Constant thresholds keep the same fraction
throughout; shifting thresholds are strict while the model is still close to pretrained (when the choice of
contexts matters most, per the paper) and relax later, so fine-tuning is not starved of data.
"""
import math


def standardize(scores, mean, std):
    """Predicted IG on the pool's z scale: (score - pool mean) / pool std. A regression learner shrinks its
    predictions towards the mean, so on its raw scale a threshold of 1.0 can reject every context; on this scale
    a threshold t keeps the contexts predicted t standard deviations above the pool's average."""
    return (scores - mean) / std


def acceptance_rate(scores, threshold):
    """Fraction of the pool (a tensor of scores) whose score passes ``threshold``."""
    return (scores >= threshold).double().mean().item()


def constant_threshold(batch, value):
    return value


def step_threshold(batch, strict, loose, switch_batch):
    """``strict`` for batches 0 .. switch_batch-1, then ``loose`` (the public example: 1.0 for 10, then -1.0)."""
    return strict if batch < switch_batch else loose


def linear_threshold(batch, strict, loose, ramp_batches):
    """From ``strict`` at batch 0 straight down to ``loose`` at batch ``ramp_batches``, then flat."""
    frac = min(batch / ramp_batches, 1.0)
    return strict + (loose - strict) * frac


def exponential_threshold(batch, strict, loose, time_constant):
    """``loose + (strict - loose) * exp(-batch / time_constant)``: a smooth decay towards ``loose``."""
    return loose + (strict - loose) * math.exp(-batch / time_constant)


SHIFTING = {"step": step_threshold, "linear": linear_threshold, "exponential": exponential_threshold}


def threshold_schedule(method, constant=0.0, schedule="step", strict=1.0, loose=-1.0, shift_batches=10):
    """The threshold function batch -> z for an IGF method name ('igf_constant' or 'igf_shifting')."""
    if method == "igf_constant":
        return lambda batch: constant_threshold(batch, constant)
    if method == "igf_shifting":
        fn = SHIFTING[schedule]
        return lambda batch: fn(batch, strict, loose, shift_batches)
    raise ValueError(f"{method!r} is not an IGF method")
