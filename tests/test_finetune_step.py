"""One IGF optimizer step is the mean gradient of exactly the kept contexts (the reference implementation
zeroed gradients per candidate, so its "batch of 16" trained on one context). Checked against an independent
computation: per-context gradients on a fresh copy, averaged by hand, one AdamW step."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

from igf.finetune import cpu_bf16_warning, finetune_run
from igf.selection import Rule, candidate_stream, select_batches

CPU = torch.device("cpu")
SEED = 1234
BATCH = 5
# lr 1e-4: a first Adam step moves each weight by lr * g / (|g| + 1e-8). Some gradients are zero up to float32
# rounding (GPT-2's key biases cannot change the attention softmax), so their ~1e-12 noise is amplified by
# lr / eps; at 1e-4 that stays below 1e-7, well inside the 1e-6 tolerance, while real updates are ~1e-4.
# Where |g| is near eps the step is ill-conditioned (d step / d g = lr eps / (|g| + eps)^2, up to lr / 4 eps):
# a gradient of 2e-8 summed in another order (5 % off) moves its weight 1e-6 differently. Those weights are
# held to the bound of any Adam step (lr); every other weight to 1e-6.
ILL_CONDITIONED = 1e-7  # |g| below 10 eps
CFG = SimpleNamespace(batch_size=BATCH, max_steps=1, learning_rate=1e-4, weight_decay=0.01, warmup_steps=0,
                      eval_every=1, eval_batch_size=8)


@pytest.fixture(scope="module")
def setup(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    pool = torch.randint(0, vocab, (30, 16), generator=g)
    test = torch.randint(0, vocab, (6, 16), generator=g)
    scores = torch.randn(30, generator=g)
    return model, pool, test, scores


def kept_rows_by_hand(pool_size, scores, threshold, batch_size, seed):
    """The candidate order of the run, filtered in the test: (kept rows, rows drawn in order)."""
    stream = candidate_stream(pool_size, torch.Generator().manual_seed(seed))
    kept, drawn = [], []
    while len(kept) < batch_size:
        row = next(stream)
        drawn.append(row)
        if scores[row] >= threshold:
            kept.append(row)
    return kept, drawn


def plan_of(pool_size, scores, threshold):
    """The run's batches as the driver plans them: the seeded stream filtered by the library's selection."""
    rule = Rule(None, lambda b: -math.inf) if threshold is None else Rule(lambda rows: scores[rows],
                                                                          lambda b: threshold)
    stream = candidate_stream(pool_size, torch.Generator().manual_seed(SEED))
    return select_batches(rule, stream, BATCH, CFG.max_steps)


def context_loss(model, ids):
    logits = model(input_ids=ids.unsqueeze(0)).logits[0]  # (T, V)
    return F.cross_entropy(logits[:-1], ids[1:])


def independent_step(pretrained, pool, rows, cfg):
    """Fresh copy; mean of per-context gradients; one AdamW step at the schedule's step-0 learning rate."""
    model = copy.deepcopy(pretrained)
    model.train()
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for row in rows:  # one context at a time: nothing batched
        grads = torch.autograd.grad(context_loss(model, pool[row]), params)
        total = [t + g for t, g in zip(total, grads)]
    for p, t in zip(params, total):
        p.grad = t / len(rows)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, foreach=False)
    sched = get_linear_schedule_with_warmup(opt, cfg.warmup_steps, cfg.max_steps)
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.learning_rate)  # linear decay: full lr at step 0
    opt.step()
    sched.step()
    return model


@pytest.mark.parametrize("threshold", [0.3, None])
def test_one_step_is_the_mean_gradient_of_the_kept_contexts(setup, threshold):
    pretrained, pool, test, scores = setup
    model = copy.deepcopy(pretrained)
    filtered = threshold is not None
    kept, drawn = kept_rows_by_hand(len(pool), scores, threshold if filtered else -math.inf, BATCH, SEED)
    if filtered:
        assert 0 < (scores >= threshold).sum() < len(pool), "the threshold must reject some of the pool"
        assert kept != drawn[:BATCH], "the filter must change the batch"
        assert len(drawn) > BATCH
    else:
        assert kept == drawn

    record = finetune_run(model, pool, test, plan_of(len(pool), scores, threshold), method="igf_constant"
                          if filtered else "standard", run=0, seed=SEED, ppl_start=99.0, cfg=CFG, device=CPU)
    assert record["candidates_drawn"] == [len(drawn)] and record["kept_rows"] == [kept]
    assert record["thresholds"] == [threshold]
    assert record["steps"] == [0, 1] and record["test_ppl"][0] == 99.0
    assert len(record["train_loss"]) == 1

    reference = independent_step(pretrained, pool, kept, CFG)
    with torch.no_grad():
        expected_loss = sum(context_loss(pretrained, pool[r]).item() for r in kept) / len(kept)
    assert record["train_loss"][0] == pytest.approx(expected_loss, rel=1e-5)
    names = [n for n, _ in model.named_parameters()]
    for name, p, q in zip(names, model.parameters(), reference.parameters()):
        # the step's gradient is still on .grad: it must be the mean of the kept contexts' gradients
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), f"gradient of {name}"
        sound = q.grad.abs() >= ILL_CONDITIONED
        assert torch.allclose(p.detach()[sound], q.detach()[sound], rtol=0, atol=1e-6), f"parameter {name}"
        assert (p.detach() - q.detach()).abs().max() <= 2 * CFG.learning_rate, f"parameter {name}"
    moved = max((p.detach() - q.detach()).abs().max().item()
                for p, q in zip(model.parameters(), pretrained.parameters()))
    assert moved > 50 * 1e-6, "the step must move the weights well beyond the tolerance"


def test_the_batch_is_not_one_context(setup):
    """The reference bug, made visible: a step on only the last kept context is a different step."""
    pretrained, pool, test, scores = setup
    model = copy.deepcopy(pretrained)
    kept, _ = kept_rows_by_hand(len(pool), scores, 0.3, BATCH, SEED)
    finetune_run(model, pool, test, plan_of(len(pool), scores, 0.3), method="igf_constant", run=0, seed=SEED,
                 ppl_start=1.0, cfg=CFG, device=CPU)
    buggy = independent_step(pretrained, pool, kept[-1:], CFG)
    diff = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), buggy.parameters()))
    assert diff > 1e-3


def test_bf16_on_a_cpu_without_native_bf16_warns():
    # emulated bf16 autocast was 13x slower than float32 on an AVX2-only EPYC: say so rather than crawl silently
    warning = cpu_bf16_warning(CPU, "bf16", native=lambda: False)
    assert warning.startswith("warning: --mixed_precision bf16") and "--mixed_precision no" in warning
    assert cpu_bf16_warning(CPU, "bf16", native=lambda: True) is None
    assert cpu_bf16_warning(CPU, "no", native=lambda: False) is None
    assert cpu_bf16_warning(torch.device("cuda"), "bf16", native=lambda: False) is None
