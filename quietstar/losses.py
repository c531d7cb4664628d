"""Quiet-STaR losses as plain functions of tensors (DESIGN §1, "Losses").

Shapes: B batch, N thought samples, L text positions, A lookahead tokens, T thought tokens, V vocab.
A target is valid when it exists (inside the row) and is neither padding nor ignored (-100).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lookahead_targets(labels: torch.Tensor, position_valid: torch.Tensor, num_lookahead: int):
    """Targets x_{j+1+s} for s = 0..A-1: ``targets [B, L, A]`` and ``valid [B, L, A]``.

    labels ``[B, L]`` (IGNORE_INDEX where not to score), position_valid ``[B, L]`` (x_j is a real token).
    """
    B, L = labels.shape
    offsets = torch.arange(1, num_lookahead + 1, device=labels.device)
    index = torch.arange(L, device=labels.device)[:, None] + offsets  # [L, A]
    inside = index < L
    gathered = labels.gather(1, index.clamp(max=L - 1).view(1, -1).expand(B, -1)).view(B, L, num_lookahead)
    valid = inside[None] & (gathered != IGNORE_INDEX) & position_valid[:, :, None].bool()
    return gathered.masked_fill(~valid, 0), valid


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32: logits ``[..., V]``, targets ``[...]`` -> ``[...]``."""
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return flat.view(targets.shape)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` (broadcast to values) holds; 0 when nothing is valid."""
    mask = mask.expand_as(values).to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def nll_loss(base_nll, base_valid, mixed_nll, mixed_valid, base_loss_weight: float):
    """L_NLL = beta * mean(l_base) + (1 - beta) * (1/A) sum_s mean(l_mix[:, :, :, s]).

    base_nll/base_valid ``[B, L]``; mixed_nll ``[B, N, L, A]``; mixed_valid ``[B, L, A]``.
    Returns the loss and the per-step mixed means ``[A]``.
    """
    num_lookahead = mixed_nll.shape[-1]
    per_step = torch.stack(
        [masked_mean(mixed_nll[..., s], mixed_valid[:, None, :, s]) for s in range(num_lookahead)]
    )
    loss = base_loss_weight * masked_mean(base_nll, base_valid) + (1 - base_loss_weight) * per_step.mean()
    return loss, per_step


def rewards(mixed_nll: torch.Tensor, mixed_valid: torch.Tensor):
    """R_{j,n} = -sum_s l_mix_{j,s,n}, detached: ``[B, N, L]``, and which positions count ``[B, L]``.

    A position counts only when all A of its targets are valid.
    """
    position_valid = mixed_valid.all(dim=-1)
    return -(mixed_nll.detach() * mixed_valid[:, None]).sum(dim=-1), position_valid


def advantages(reward: torch.Tensor, clip_negative: bool) -> torch.Tensor:
    """r_{j,n} = R_{j,n} - mean_n R_{j,n}, clipped at 0 when ``clip_negative``: ``[B, N, L]``."""
    advantage = reward - reward.mean(dim=1, keepdim=True)
    return advantage.clamp(min=0) if clip_negative else advantage


def thought_logprobs(sample_logits: torch.Tensor, thoughts: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(z / tau)[c] for each sampled thought token: logits ``[B, N, L, T, V]`` -> ``[B, N, L, T]``."""
    logprobs = torch.log_softmax(sample_logits.float() / temperature, dim=-1)
    return logprobs.gather(-1, thoughts.unsqueeze(-1)).squeeze(-1)


def policy_loss(logprobs: torch.Tensor, advantage: torch.Tensor, position_valid: torch.Tensor) -> torch.Tensor:
    """L_RL = mean over valid j, all n and m of -advantage_{j,n} * log pi(c_{j,m}).

    logprobs ``[B, N, L, T]``, advantage ``[B, N, L]``, position_valid ``[B, L]``.
    """
    per_token = -advantage.detach().unsqueeze(-1) * logprobs
    return masked_mean(per_token, position_valid[:, None, :, None])


def quietstar_loss(
    base_logits,
    mixed_logits,
    sample_logits,
    thoughts,
    mixing_weights,
    labels,
    position_valid,
    *,
    base_loss_weight: float,
    policy_weight: float,
    reinforce_temperature: float,
    clip_negative_advantage: bool,
):
    """The whole Quiet-STaR objective L = L_NLL + lambda * L_RL, and its metrics.

    base_logits ``[B, L, V]``, mixed_logits ``[B, N, L, A, V]``, sample_logits ``[B, N, L, T, V]``
    (the thought-token-masked logits each c_{j,m} was sampled from), thoughts ``[B, N, L, T]``,
    mixing_weights ``[B, N, L, A]`` (weight on the thought path), labels ``[B, L]``,
    position_valid ``[B, L]``. Returns ``(loss, metrics)`` with metrics a dict of floats.
    """
    num_lookahead = mixed_logits.shape[-2]
    targets, target_valid = lookahead_targets(labels, position_valid, num_lookahead)
    base_nll = token_nll(base_logits, targets[..., 0])
    mixed_nll = token_nll(mixed_logits, targets[:, None].expand(mixed_logits.shape[:-1]))
    nll, per_step = nll_loss(base_nll, target_valid[..., 0], mixed_nll, target_valid, base_loss_weight)
    reward, reward_valid = rewards(mixed_nll, target_valid)
    advantage = advantages(reward, clip_negative_advantage)
    logprobs = thought_logprobs(sample_logits, thoughts, reinforce_temperature)
    rl = policy_loss(logprobs, advantage, reward_valid)
    loss = nll + policy_weight * rl

    with torch.no_grad():
        valid = reward_valid[:, None].expand_as(reward)
        raw_advantage = reward - reward.mean(dim=1, keepdim=True)
        metrics = {
            "loss": loss.item(),
            "nll_loss": nll.item(),
            "policy_loss": rl.item(),
            "base_nll": masked_mean(base_nll, target_valid[..., 0]).item(),
            "reward_mean": reward[valid].mean().item() if valid.any() else 0.0,
            "reward_std": reward[valid].std().item() if valid.sum() > 1 else 0.0,
            "positive_advantage_fraction": (raw_advantage[valid] > 0).float().mean().item() if valid.any() else 0.0,
            "mixing_weight_mean": masked_mean(mixing_weights.float(), target_valid[:, None]).item(),
        }
        for s, value in enumerate(per_step.tolist()):
            metrics[f"mixed_nll_{s}"] = value
    return loss, metrics
