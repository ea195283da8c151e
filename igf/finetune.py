"""Fine-tuning runs: every method with the same optimizer, schedule, batch size, steps and candidate stream.

Which candidates a run keeps is decided by its selection rule (igf/selection.py: IGF, standard and the
controls differ only there), before the first step for the static rules and at each step for the online ones,
which score with the model as it is. A run then takes one ordinary AdamW step per planned batch, on the batch's mean
loss: gradients are zeroed once per step, never per candidate.
"""
import contextlib
import math
import time
from copy import deepcopy

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


def train_steps_fe(batch_size):
    """LM forward-equivalents of one training step on ``batch_size`` contexts: a forward and a backward pass (the
    backward costs about two forwards), the unit of the study's compute accounting."""
    return 3.0 * batch_size


def finetune_run(model, pool, test, selector, *, method, run, seed, ppl_start, cfg, device,
                 autocast=contextlib.nullcontext, progress=None, final_test=None):
    """One seeded fine-tuning run from the current (pretrained) weights on the batches ``selector`` gives
    (igf.selection: a Plan made before the first step, or an online selection that picks batch b with the model as
    it is after b steps). Returns its record: test-perplexity curve, training loss, what was drawn, kept and
    scored, and what it cost: ``cost`` in LM forward-equivalents (setup, and per batch selection and training) and
    ``seconds`` the same in wall time (not reproducible, so the driver saves it beside the record).

    ``ppl_start`` is the pretrained test perplexity (shared by every run, so measured once by the caller).
    ``final_test``: a larger test sample (N, T) whose perplexity is measured once, after the last step.
    Training steps run under ``autocast()``; test perplexity is always measured without it (full precision).
    """
    torch.manual_seed(seed)  # anything stochastic inside the model (dropout)
    optimizer, scheduler = make_optimizer(model, cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps,
                                          cfg.max_steps)
    record = {"method": method, "run": run, "seed": seed, "batch_size": cfg.batch_size,
              "context_len": pool.shape[1], "steps": [0], "test_ppl": [ppl_start], "train_loss": []}
    train_seconds = []
    for step in range(1, cfg.max_steps + 1):
        rows = selector.next(step - 1)
        t = time.perf_counter()
        loss = optimizer_step(model, optimizer, scheduler, pool[rows].to(device), autocast)
        train_seconds.append(time.perf_counter() - t)
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
                       f"train loss {loss:.3f}  kept {cfg.batch_size}/{selector.plan.drawn[step - 1]} candidates")
        if progress is not None:
            progress.update(1)
    if final_test is not None:
        record["final_test_ppl_large"] = perplexity(model, final_test, cfg.eval_batch_size, device)
        record["size_final_test_set"] = len(final_test)
        tqdm.write(f"[{method} run {run}] test PPL on {len(final_test)} contexts {record['final_test_ppl_large']:.3f}")
    plan = selector.plan
    record.update(candidates_drawn=list(plan.drawn), thresholds=list(plan.thresholds),
                  kept_rows=[list(r) for r in plan.batches], **plan.extras(),
                  cost={"setup": plan.setup["forward_equivalents"], "selection": list(plan.selection_fe),
                        "train": [train_steps_fe(cfg.batch_size)] * cfg.max_steps},
                  # wall times differ between two runs of the same record: the driver keeps them beside it
                  seconds={"setup": plan.setup["seconds"], "selection": list(plan.selection_seconds),
                           "train": train_seconds})
    del optimizer, scheduler  # AdamW state is twice the model: free it before the next run
    return record


def conditional_model(model, contexts, steps, lr, batch_size, seed, device):
    """CoLoR-Filter's conditional model: a copy of ``model`` fine-tuned on target-domain ``contexts`` (N, T) for
    ``steps`` AdamW steps of ``batch_size`` contexts (drawn without replacement, a fresh seeded permutation per
    pass), the learning rate decayed linearly to 0. Returns (the copy in eval mode, LM forward-equivalents spent).
    The original model is untouched."""
    copy = deepcopy(model)
    optimizer, scheduler = make_optimizer(copy, lr, 0.0, 0, steps)
    g, order = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(contexts), generator=g).tolist()
        rows, order = order[:batch_size], order[batch_size:]
        optimizer_step(copy, optimizer, scheduler, contexts[rows].to(device))
    del optimizer, scheduler
    copy.eval()
    for p in copy.parameters():
        p.requires_grad_(False)
    return copy, steps * train_steps_fe(batch_size)
