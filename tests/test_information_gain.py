"""Information gain on the tiny GPT-2: the exact estimator equals an independent computation in plain torch, the
first-order estimators equal independent autograd computations of their formulas, the chunked loss equals the
plain one, the weights are restored bit-exactly after every pair, and resuming is exact."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from igf.estimators import ADAM_EPS, collect_ig_pairs, make_estimator
from igf.information_gain import context_losses, lm_loss, perplexity, token_nll, token_nlls

CPU = torch.device("cpu")
LR = {"sgd": 0.5, "adam": 1e-3}  # SGD gradients of the tiny model are small: a large step makes IG visible


@pytest.fixture(scope="module")
def pretrained(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def contexts(pretrained):
    g = torch.Generator().manual_seed(0)
    vocab = pretrained.config.vocab_size
    return {"train": torch.randint(0, vocab, (12, 16), generator=g),
            "objective": torch.randint(0, vocab, (7, 16), generator=g)}


def hand_loss(model, ids):
    """Mean next-token cross-entropy, written out: position t predicts token t + 1."""
    logits = model(input_ids=ids).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


@torch.no_grad()
def hand_ppl(model, ids):
    return math.exp(hand_loss(model, ids).item())


def hand_ig(pretrained, x, objective, optimizer_name, lr):
    """IG of context x from scratch: a fresh copy of the pretrained model, one step on x alone."""
    model = copy.deepcopy(pretrained)
    model.train()
    before = hand_ppl(model, objective)
    loss = hand_loss(model, x.unsqueeze(0))
    params = list(model.parameters())
    if optimizer_name == "sgd":
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
    else:
        opt = torch.optim.Adam(params, lr=lr)
        loss.backward()
        opt.step()
    return before - hand_ppl(model, objective), math.exp(loss.item())


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_ig_matches_independent_computation(pretrained, contexts, optimizer_name):
    lr = LR[optimizer_name]
    model = copy.deepcopy(pretrained)
    train, objective = contexts["train"], contexts["objective"]
    ppl_before = perplexity(model, objective, 3, CPU)  # batches of 3: exercises the accumulation
    assert ppl_before == pytest.approx(hand_ppl(pretrained, objective), rel=1e-6)

    estimator = make_estimator("exact", model, optimizer_name, lr, objective, ppl_before, 3, CPU)
    indices = torch.tensor([5, 0, 9])
    pairs = collect_ig_pairs(estimator, train, indices, [])
    assert [p["context_index"] for p in pairs] == [5, 0, 9]
    assert [p["pair"] for p in pairs] == [0, 1, 2]
    igs = []
    for p in pairs:
        row = p["context_index"]
        assert p["tokens"] == train[row].tolist()
        ig, ctx_ppl = hand_ig(pretrained, train[row], objective, optimizer_name, lr)
        igs.append(ig)
        assert p["context_ppl"] == pytest.approx(ctx_ppl, rel=1e-6)
        # IG is a difference of two perplexities of ~30: compare it relative to their scale and to itself
        assert p["ig"] == pytest.approx(ig, rel=1e-4, abs=1e-4 * abs(ig) + 1e-6 * ppl_before)
    assert max(abs(v) for v in igs) > 1e-3, "the step must move the objective perplexity measurably"
    assert len({round(v, 6) for v in igs}) == 3, "different contexts should have different IG"

    (ig, ctx_ppl), = estimator(train[[5]])  # the same context again: the same number, to the bit
    assert ig == pairs[0]["ig"] and ctx_ppl == pairs[0]["context_ppl"]


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_weights_restored_and_optimizer_cleared_after_every_pair(pretrained, contexts, optimizer_name):
    model = copy.deepcopy(pretrained)
    original = params_of(pretrained)
    objective = contexts["objective"]
    ppl_before = perplexity(model, objective, 8, CPU)
    estimator = make_estimator("exact", model, optimizer_name, LR[optimizer_name], objective, ppl_before, 8, CPU)
    optimizer = estimator.optimizer
    checks = []

    def check(pairs):
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), original)), \
            f"weights differ from pretrained after pair {len(pairs) - 1}"
        # the optimizer is as if freshly built: no state, or state reset to zero (Adam's moments and step count)
        for state in optimizer.state.values():
            for value in state.values():
                assert not torch.is_tensor(value) or not value.any(), "optimizer state survived the pair"
        checks.append(len(pairs))

    collect_ig_pairs(estimator, contexts["train"], torch.arange(4), [], on_checkpoint=check, save_every=1)
    assert checks == [1, 2, 3, 4]


@pytest.mark.parametrize("estimator_name,optimizer_name", [("exact", "adam"), ("first_order", "sgd")])
def test_resume_gives_the_uninterrupted_pairs(pretrained, contexts, estimator_name, optimizer_name):
    train, objective = contexts["train"], contexts["objective"]
    indices = torch.tensor([3, 7, 1, 10, 4, 0, 8])

    def run(pairs):
        model = copy.deepcopy(pretrained)  # a resumed process starts from freshly loaded weights
        ppl_before = perplexity(model, objective, 4, CPU)
        estimator = make_estimator(estimator_name, model, optimizer_name, LR[optimizer_name], objective,
                                   ppl_before, 4, CPU)  # first order: chunks of 4 contexts
        return collect_ig_pairs(estimator, train, indices, pairs, on_checkpoint=lambda ps: saved.append(len(ps)),
                                save_every=2)

    saved = []
    full = run([])
    assert len(full) == len(indices)
    assert saved == ([2, 4, 6, 7] if estimator_name == "exact" else [4, 7])  # each chunk crossing 2k, the end
    for cut in ({"exact": 2, "first_order": 4}[estimator_name], 7):  # a checkpoint mid-way, and complete
        prefix = copy.deepcopy(full[:cut])
        resumed = run(prefix)
        assert resumed is prefix  # extended in place
        assert resumed == full


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_loss_equals_the_plain_loss(pretrained, contexts, chunk):
    ids = contexts["objective"]
    plain_sum, n = token_nll(pretrained(input_ids=ids).logits, ids)
    chunked = token_nlls(pretrained, ids, chunk_positions=chunk)  # (B, T-1)
    assert chunked.shape == (ids.shape[0], ids.shape[1] - 1) and n == chunked.numel()
    assert chunked.sum().item() == pytest.approx(plain_sum.item(), rel=1e-6)
    assert lm_loss(pretrained, ids).item() == pytest.approx(hand_loss(pretrained, ids).item(), rel=1e-6)
    per_context = context_losses(pretrained, ids, 3, CPU)
    expected = [hand_loss(pretrained, ids[i: i + 1]).item() for i in range(len(ids))]
    assert per_context.tolist() == pytest.approx(expected, rel=1e-6)


def flat_grad(model, loss):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_first_order_ig_equals_its_formula(pretrained, contexts, optimizer_name):
    """PPL_obj * lr * <g_obj, d> with d = g_X (sgd) or g_X/(|g_X|+eps) (adam), computed independently with
    autograd in float64; the SGD estimator's dual form (two forward passes) agrees to first order in lr."""
    model = copy.deepcopy(pretrained).double()
    train, objective = contexts["train"][:6], contexts["objective"]
    lr = {"sgd": 1e-6, "adam": 1e-4}[optimizer_name]  # float64: a tiny finite-difference step is still precise
    ppl = perplexity(model, objective, 3, CPU)
    estimator = make_estimator("first_order", model, optimizer_name, lr, objective, ppl, 3, CPU)
    estimates = collect_ig_pairs(estimator, train, torch.arange(len(train)), [])
    g_obj = flat_grad(model, hand_loss(model, objective))
    for pair, x in zip(estimates, train):
        g_x = flat_grad(model, hand_loss(model, x.unsqueeze(0)))
        step = g_x if optimizer_name == "sgd" else g_x / (g_x.abs() + ADAM_EPS)
        expected = ppl * lr * torch.dot(g_obj, step).item()
        # sgd: a finite difference, exact to O(lr^2); adam: the same dot product, to float64 rounding
        assert pair["ig"] == pytest.approx(expected, rel=1e-3 if optimizer_name == "sgd" else 1e-9)
        assert pair["context_ppl"] == pytest.approx(math.exp(hand_loss(model, x.unsqueeze(0)).item()), rel=1e-9)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), pretrained.double().parameters()))


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_first_order_tracks_exact_ig(pretrained, contexts, optimizer_name):
    from scipy import stats

    lr = {"sgd": 0.005, "adam": 1e-4}[optimizer_name]  # small steps: where a first-order estimate should hold
    train, objective = contexts["train"], contexts["objective"]
    out = {}
    for name in ("exact", "first_order"):
        model = copy.deepcopy(pretrained)
        ppl = perplexity(model, objective, 4, CPU)
        out[name] = [p["ig"] for p in collect_ig_pairs(make_estimator(name, model, optimizer_name, lr, objective,
                                                                      ppl, 4, CPU), train,
                                                       torch.arange(len(train)), [])]
    assert stats.pearsonr(out["exact"], out["first_order"])[0] > 0.98
