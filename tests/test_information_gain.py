"""Information gain on the tiny GPT-2: the library's single step + objective perplexity equals an independent
computation in plain torch, the weights are restored bit-exactly after every pair, and resuming is exact."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from igf.information_gain import WeightSnapshot, collect_ig_pairs, ig_of_context, make_ig_optimizer, perplexity

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

    optimizer = make_ig_optimizer(optimizer_name, model.parameters(), lr)
    indices = torch.tensor([5, 0, 9])
    pairs = collect_ig_pairs(model, optimizer, train, indices, objective, ppl_before, 3, CPU, [])
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

    snapshot = WeightSnapshot(model)  # ig_of_context on one context: the same number again
    ig, ctx_ppl = ig_of_context(model, optimizer, snapshot, train[5], objective, ppl_before, 3, CPU)
    assert ig == pairs[0]["ig"] and ctx_ppl == pairs[0]["context_ppl"]


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_weights_restored_and_optimizer_cleared_after_every_pair(pretrained, contexts, optimizer_name):
    model = copy.deepcopy(pretrained)
    original = params_of(pretrained)
    optimizer = make_ig_optimizer(optimizer_name, model.parameters(), LR[optimizer_name])
    objective = contexts["objective"]
    checks = []

    def check(pairs):
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), original)), \
            f"weights differ from pretrained after pair {len(pairs) - 1}"
        # the optimizer is as if freshly built: no state, or state reset to zero (Adam's moments and step count)
        for state in optimizer.state.values():
            for value in state.values():
                assert not torch.is_tensor(value) or not value.any(), "optimizer state survived the pair"
        checks.append(len(pairs))

    ppl_before = perplexity(model, objective, 8, CPU)
    collect_ig_pairs(model, optimizer, contexts["train"], torch.arange(4), objective, ppl_before, 8, CPU, [],
                     on_checkpoint=check, save_every=1)
    assert checks == [1, 2, 3, 4]


def test_resume_gives_the_uninterrupted_pairs(pretrained, contexts):
    train, objective = contexts["train"], contexts["objective"]
    indices = torch.tensor([3, 7, 1, 10, 4, 0])

    def run(pairs):
        model = copy.deepcopy(pretrained)  # a resumed process starts from freshly loaded weights
        optimizer = make_ig_optimizer("adam", model.parameters(), LR["adam"])
        ppl_before = perplexity(model, objective, 4, CPU)
        return collect_ig_pairs(model, optimizer, train, indices, objective, ppl_before, 4, CPU, pairs)

    full = run([])
    assert len(full) == len(indices)
    for cut in (2, 6):  # mid-way, and already complete (nothing to do)
        prefix = copy.deepcopy(full[:cut])
        resumed = run(prefix)
        assert resumed is prefix  # extended in place
        assert resumed == full
