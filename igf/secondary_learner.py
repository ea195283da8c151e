"""The secondary learner: a small 1-D convolutional net that predicts a context's z-scored IG from its tokens.

    tokens (B, T) -> LM input embeddings, copied and frozen (B, D, T) -> Conv1d + ReLU (B, C, T)
                  -> max over positions (B, C) -> Linear + ReLU + Dropout -> Linear -> predicted z (B,)

The embeddings are a copy of the LM's, never the LM's own tensor (fine-tuning must not change the filter, and
the filter must not change the LM). They are frozen: a few hundred IG pairs are far too few to train tens of
millions of embedding weights. The ReLU between the layers matters: without it (as in the public example) the
whole head collapses into one affine map of the pooled features.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats


class SecondaryLearner(nn.Module):
    def __init__(self, embeddings, channels=64, kernel_size=3, hidden=32, dropout=0.1):
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(embeddings.detach().to("cpu", torch.float32).clone(), freeze=True)
        self.conv = nn.Conv1d(self.embed.embedding_dim, channels, kernel_size, padding=kernel_size // 2)
        self.head = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, ids):
        h = self.embed(ids).transpose(1, 2)  # (B, D, T)
        h = F.relu(self.conv(h)).amax(dim=2)  # (B, C)
        return self.head(h).squeeze(-1)  # (B,)

    def trainable_state(self):
        """Weights to save: everything but the frozen embedding copy, which is rebuilt from the LM on load."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("embed.")}


@torch.no_grad()
def predict(learner, contexts, batch_size=512):
    """Predicted z-scored IG of each context (N, T) -> (N,), in eval mode (no dropout)."""
    learner.eval()
    return torch.cat([learner(chunk) for chunk in contexts.split(batch_size)])


def correlations(pred, target):
    """Pearson and Spearman correlation of predicted vs actual values (None when undefined)."""
    pred, target = [torch.as_tensor(v, dtype=torch.float64).numpy() for v in (pred, target)]
    if len(pred) < 2 or pred.std() == 0 or target.std() == 0:
        return {"pearson": None, "spearman": None}
    return {"pearson": float(stats.pearsonr(pred, target)[0]), "spearman": float(stats.spearmanr(pred, target)[0])}


def split_pairs(n, val_fraction, generator):
    """Random (train_idx, val_idx) with at least one pair on each side."""
    perm = torch.randperm(n, generator=generator)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def _clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


def train_learner(learner, tokens, z, val_fraction, epochs, lr, batch_size, generator):
    """Fit predicted z to actual z (MSE) on a training split; keep the epoch with the lowest validation MSE.

    tokens (N, T), z (N,). Returns metrics: validation MSE, Pearson / Spearman on both splits, best epoch.
    """
    train_idx, val_idx = split_pairs(len(z), val_fraction, generator)
    opt = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=lr)
    best = (math.inf, 0, _clone(learner.trainable_state()))
    for epoch in range(1, epochs + 1):
        learner.train()
        order = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for batch in order.split(batch_size):
            loss = F.mse_loss(learner(tokens[batch]), z[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val_mse = F.mse_loss(predict(learner, tokens[val_idx]), z[val_idx]).item()
        if val_mse < best[0]:
            best = (val_mse, epoch, _clone(learner.trainable_state()))
    learner.load_state_dict(best[2], strict=False)
    val = correlations(predict(learner, tokens[val_idx]), z[val_idx])
    train = correlations(predict(learner, tokens[train_idx]), z[train_idx])
    return {"val_mse": best[0], "best_epoch": best[1], "n_train": len(train_idx), "n_val": len(val_idx),
            "val_pearson": val["pearson"], "val_spearman": val["spearman"],
            "train_pearson": train["pearson"], "train_spearman": train["spearman"]}
