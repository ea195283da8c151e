"""Standard and IGF fine-tuning: the same optimizer, schedule, batch size, steps and candidate stream.

Each run draws candidate contexts from the training pool in a seeded random order. Standard fine-tuning keeps
every candidate. IGF scores each candidate with the secondary learner first (scores are precomputed for the
whole pool, so a rejected context costs no LM forward or backward) and keeps it when its predicted z-scored IG
passes the threshold of the batch being filled. When ``batch_size`` contexts are kept, one ordinary AdamW step
is taken on their mean loss: gradients are zeroed once per step, never per candidate.
"""
import math

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .errors import IGFError
from .information_gain import lm_loss, perplexity


def candidate_stream(pool_size, generator):
    """Pool rows in random order, endlessly: a fresh permutation for every pass over the pool."""
    while True:
        yield from torch.randperm(pool_size, generator=generator).tolist()


def select_batch(stream, batch_size, scores=None, threshold=-math.inf):
    """Draw candidates until ``batch_size`` are kept (score >= threshold; ``scores=None`` keeps every one).

    Returns (kept rows, candidates drawn). The caller guarantees some pool row passes the threshold.
    """
    kept, drawn = [], 0
    while len(kept) < batch_size:
        row = next(stream)
        drawn += 1
        if scores is None or scores[row] >= threshold:
            kept.append(row)
    return kept, drawn


def standardize_scores(scores):
    """Predicted IG re-standardized over the pool (mean 0, std 1). A regression learner shrinks its predictions
    towards the mean, so on its raw scale a threshold of 1.0 can reject every context; on this scale a threshold
    t keeps the contexts predicted t standard deviations above the pool's average."""
    std = scores.std(unbiased=False)
    if not std > 0:
        raise IGFError("the secondary learner predicts the same IG for every training context; nothing to filter "
                       "by (collect more IG pairs or train the learner longer)")
    return (scores - scores.mean()) / std


def acceptance_rate(scores, threshold):
    """Fraction of the pool whose predicted z-scored IG passes ``threshold``."""
    return (scores >= threshold).double().mean().item()


def make_optimizer(model, lr, weight_decay, warmup_steps, max_steps):
    """AdamW (fused where the build supports it: ~3x faster steps on CPU) with a linear decay to zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup_steps, max_steps)


def optimizer_step(model, optimizer, scheduler, batch):
    """One step on the mean next-token loss of ``batch`` (B, T): the mean gradient of exactly these contexts."""
    model.train()
    optimizer.zero_grad(set_to_none=False)  # once per step; in place, so the buffers are reused
    loss = lm_loss(model, batch)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def finetune_run(model, pool, test, *, method, run, seed, ppl_start, scores, threshold_fn, cfg, device,
                 progress=None):
    """One seeded fine-tuning run from the current (pretrained) weights. Returns its record (curves, counts).

    ``scores`` (N_pool,) and ``threshold_fn(batch)`` are None for standard fine-tuning. ``ppl_start`` is the
    pretrained test perplexity (shared by every run, so measured once by the caller).
    """
    generator = torch.Generator().manual_seed(seed)  # the candidate order
    torch.manual_seed(seed)  # anything stochastic inside the model (dropout)
    stream = candidate_stream(len(pool), generator)
    optimizer, scheduler = make_optimizer(model, cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps,
                                          cfg.max_steps)
    record = {"method": method, "run": run, "seed": seed, "batch_size": cfg.batch_size,
              "context_len": pool.shape[1], "steps": [0], "test_ppl": [ppl_start],
              "train_loss": [], "candidates_drawn": [], "thresholds": []}
    for step in range(1, cfg.max_steps + 1):
        threshold = threshold_fn(step - 1) if threshold_fn else None
        rows, drawn = select_batch(stream, cfg.batch_size, scores, threshold if threshold is not None else -math.inf)
        loss = optimizer_step(model, optimizer, scheduler, pool[rows].to(device))
        if not math.isfinite(loss):
            raise IGFError(f"non-finite training loss at step {step} of {method} run {run} (seed {seed}); "
                           "lower --learning_rate")
        record["train_loss"].append(loss)
        record["candidates_drawn"].append(drawn)
        record["thresholds"].append(threshold)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            ppl = perplexity(model, test, cfg.eval_batch_size, device)
            if not math.isfinite(ppl):
                raise IGFError(f"non-finite test perplexity after step {step} of {method} run {run} (seed {seed}); "
                               "lower --learning_rate")
            record["steps"].append(step)
            record["test_ppl"].append(ppl)
            tqdm.write(f"[{method} run {run}] step {step:3d}/{cfg.max_steps}  test PPL {ppl:8.3f}  "
                       f"train loss {loss:.3f}  kept {cfg.batch_size}/{drawn} candidates")
        if progress is not None:
            progress.update(1)
    del optimizer, scheduler  # AdamW state is twice the model: free it before the next run
    return record
