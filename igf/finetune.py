"""Fine-tuning runs: every method with the same optimizer, schedule, batch size, steps and candidate stream.

Which candidates a run keeps is decided before its first step (igf/selection.py: IGF, standard and the
controls differ only there). A run then takes one ordinary AdamW step per planned batch, on the batch's mean
loss: gradients are zeroed once per step, never per candidate.
"""
import contextlib
import math

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .errors import IGFError
from .information_gain import lm_loss, perplexity


def make_optimizer(model, lr, weight_decay, warmup_steps, max_steps):
    """AdamW (fused where the build supports it: ~3x faster steps on CPU) with a linear decay to zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup_steps, max_steps)


def cpu_bf16_warning(device, mixed_precision, native=torch.ops.mkldnn._is_mkldnn_bf16_supported):
    """The warning to print when bf16 autocast is asked of a CPU without native bf16 (AVX-512 BF16 or AMX), else
    None. There autocast emulates bf16: one SmolLM2 training step of 8 x 32 tokens took 60 s against 3-5 s in
    float32 on an AVX2-only EPYC (it is 1.7x faster than float32 on one with AVX-512 BF16)."""
    if mixed_precision != "bf16" or device.type != "cpu" or native():
        return None
    return ("warning: --mixed_precision bf16 on a CPU without native bf16 (AVX-512 BF16 or AMX): autocast is "
            "emulated, about 13x slower than float32 here; --mixed_precision no is faster")


def optimizer_step(model, optimizer, scheduler, batch, autocast=contextlib.nullcontext):
    """One step on the mean next-token loss of ``batch`` (B, T): the mean gradient of exactly these contexts.
    ``autocast()`` wraps the forward pass (bf16 mixed precision); the backward pass follows its casts."""
    model.train()
    optimizer.zero_grad(set_to_none=False)  # once per step; in place, so the buffers are reused
    with autocast():
        loss = lm_loss(model, batch)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def finetune_run(model, pool, test, plan, *, method, run, seed, ppl_start, cfg, device,
                 autocast=contextlib.nullcontext, progress=None):
    """One seeded fine-tuning run from the current (pretrained) weights on the batches of ``plan``
    (igf.selection.Plan). Returns its record: test-perplexity curve, training loss, candidates drawn per batch.

    ``ppl_start`` is the pretrained test perplexity (shared by every run, so measured once by the caller).
    Training steps run under ``autocast()``; test perplexity is always measured without it (full precision).
    """
    torch.manual_seed(seed)  # anything stochastic inside the model (dropout)
    optimizer, scheduler = make_optimizer(model, cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps,
                                          cfg.max_steps)
    record = {"method": method, "run": run, "seed": seed, "batch_size": cfg.batch_size,
              "context_len": pool.shape[1], "steps": [0], "test_ppl": [ppl_start], "train_loss": [],
              "candidates_drawn": list(plan.drawn), "thresholds": list(plan.thresholds),
              "kept_rows": [list(rows) for rows in plan.batches]}
    for step, rows in enumerate(plan.batches, start=1):
        loss = optimizer_step(model, optimizer, scheduler, pool[rows].to(device), autocast)
        if not math.isfinite(loss):
            raise IGFError(f"non-finite training loss at step {step} of {method} run {run} (seed {seed}); "
                           "lower --learning_rate")
        record["train_loss"].append(loss)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            ppl = perplexity(model, test, cfg.eval_batch_size, device)
            if not math.isfinite(ppl):
                raise IGFError(f"non-finite test perplexity after step {step} of {method} run {run} (seed {seed}); "
                               "lower --learning_rate")
            record["steps"].append(step)
            record["test_ppl"].append(ppl)
            tqdm.write(f"[{method} run {run}] step {step:3d}/{cfg.max_steps}  test PPL {ppl:8.3f}  "
                       f"train loss {loss:.3f}  kept {cfg.batch_size}/{plan.drawn[step - 1]} candidates")
        if progress is not None:
            progress.update(1)
    del optimizer, scheduler  # AdamW state is twice the model: free it before the next run
    return record
