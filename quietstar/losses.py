"""Quiet-STaR losses as plain functions of tensors (docs/design.md §1, "Losses").

Shapes: B batch, N thought samples, L text positions, A lookahead tokens, T thought tokens, V vocab.
A target is valid when it exists (inside the row) and is neither padding nor ignored (-100).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .loss_config import QuietStarLossConfig
from .ops.precision import at_least_fp32

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
    """Per-token cross-entropy in fp32 (or wider): logits ``[..., V]``, targets ``[...]`` -> ``[...]``."""
    flat = F.cross_entropy(at_least_fp32(logits.reshape(-1, logits.shape[-1])), targets.reshape(-1), reduction="none")
    return flat.view(targets.shape)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` (broadcast to values) holds; 0 when nothing is valid."""
    mask = mask.expand_as(values).to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def per_step_nll(nll: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid (b, n, j) of ``nll [B, N, L, A]`` for each lookahead step s: ``[A]``; ``valid [B, L, A]``."""
    return torch.stack([masked_mean(nll[..., s], valid[:, None, :, s]) for s in range(nll.shape[-1])])


def nll_loss(base_nll, base_valid, mixed_nll, mixed_valid, base_loss_weight: float):
    """L_NLL = beta * mean(l_base) + (1 - beta) * (1/A) sum_s mean(l_mix[:, :, :, s]).

    base_nll/base_valid ``[B, L]``; mixed_nll ``[B, N, L, A]``; mixed_valid ``[B, L, A]``.
    Returns the loss and the per-step mixed means ``[A]``.
    """
    per_step = per_step_nll(mixed_nll, mixed_valid)
    loss = base_loss_weight * masked_mean(base_nll, base_valid) + (1 - base_loss_weight) * per_step.mean()
    return loss, per_step


def rewards(nll: torch.Tensor, valid: torch.Tensor):
    """R_{j,n} = -sum_s l_{j,s,n}, detached: ``[B, N, L]``, and which positions count ``[B, L]``.

    ``nll [B, N, L, A]`` is the per-token NLL the reward is made of (mixed or thought path), ``valid [B, L, A]``.
    A position counts only when all A of its targets are valid.
    """
    position_valid = valid.all(dim=-1)
    return -(nll.detach() * valid[:, None]).sum(dim=-1), position_valid


def advantages(reward: torch.Tensor, clip_negative: bool, normalization: str = "none", std_floor: float = 0.01,
               position_valid: torch.Tensor | None = None) -> torch.Tensor:
    """r_{j,n} = R_{j,n} - mean_n R_{j,n} ``[B, N, L]``; with ``normalization="batch_std"`` divided by the batch's
    standard deviation of r over valid positions ``[B, L]`` (at least ``std_floor``); clipped at 0 when
    ``clip_negative``. Centred and unclipped, E[r | thought tokens] = 0 when rewards carry no information."""
    advantage = reward - reward.mean(dim=1, keepdim=True)
    if normalization == "batch_std":
        valid = (torch.ones_like(reward[:, 0], dtype=torch.bool) if position_valid is None else position_valid)
        spread = masked_mean(advantage.square(), valid[:, None]).sqrt()  # r is centred: its RMS is its std
        advantage = advantage / spread.clamp(min=std_floor)
    elif normalization != "none":
        raise ValueError(f"Unknown advantage normalization {normalization!r}; use 'none' or 'batch_std'.")
    return advantage.clamp(min=0) if clip_negative else advantage


def thought_logprobs(sample_logits: torch.Tensor, thoughts: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(z / tau)[c] for each sampled thought token: logits ``[B, N, L, T, V]`` -> ``[B, N, L, T]``."""
    logits = at_least_fp32(sample_logits)
    logprobs = torch.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)
    return logprobs.gather(-1, thoughts.unsqueeze(-1)).squeeze(-1)


def policy_loss(logprobs: torch.Tensor, advantage: torch.Tensor, position_valid: torch.Tensor) -> torch.Tensor:
    """L_RL = mean over valid j, all n and m of -advantage_{j,n} * log pi(c_{j,m}).

    logprobs ``[B, N, L, T]``, advantage ``[B, N, L]``, position_valid ``[B, L]``.
    """
    per_token = -advantage.detach().unsqueeze(-1) * logprobs
    return masked_mean(per_token, position_valid[:, None, :, None])


def base_nll_ahead(base_nll: torch.Tensor, num_lookahead: int) -> torch.Tensor:
    """The base model's NLL of each lookahead target x_{j+1+s}, which it predicts at position j + s:
    ``base_nll [B, L]`` (position j: the NLL of x_{j+1}) -> ``[B, L, A]``; entries past the row are meaningless."""
    L = base_nll.shape[1]
    index = (torch.arange(L, device=base_nll.device)[:, None] + torch.arange(num_lookahead, device=base_nll.device))
    return base_nll[:, index.clamp(max=L - 1)]


def mixing_prior(weights: torch.Tensor, thought_nll: torch.Tensor, base_nll: torch.Tensor,
                 valid: torch.Tensor) -> torch.Tensor:
    """L_prior = mean over valid (b, n, j, s) of w_{j,s} * max(0, l_thought - l_base), NLLs detached: it pulls w towards
    0 exactly where the thought path does not beat the base prediction, and is zero where it does. With logit mixing
    and w in [0, 1] (convexity of the NLL in the logits) it bounds how much mixing can cost over the base model:
    l_mix - l_base <= w (l_thought - l_base) <= w max(0, l_thought - l_base).

    weights/thought_nll ``[B, N, L, A]``, base_nll ``[B, L, A]`` (:func:`base_nll_ahead`), valid ``[B, L, A]``.
    """
    excess = (thought_nll.detach() - base_nll.detach()[:, None]).clamp(min=0)
    return masked_mean(weights * excess, valid[:, None])


@torch.no_grad()
def sampling_entropy(sample_logits: torch.Tensor, temperature: float, position_valid: torch.Tensor,
                     stride: int = 4) -> float:
    """Mean entropy (nats) of the distributions the thought tokens were drawn from (``[B, N, L, T, V]`` logits at
    ``temperature``), estimated on the first thought of every ``stride``-th valid position (``[B, L]``): a diagnostic,
    not worth a pass over all N * L * T * V logits."""
    logits = at_least_fp32(sample_logits[:, :1, ::stride])
    logprobs = torch.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)
    floor = torch.finfo(logprobs.dtype).min  # masked tokens: 0 * -inf would be NaN
    entropy = -(logprobs.exp() * logprobs.clamp(min=floor)).sum(dim=-1)
    return masked_mean(entropy, position_valid[:, None, ::stride, None]).item()


def total_loss(terms: dict) -> torch.Tensor:
    """L = L_NLL + gamma * L_thought + lambda * L_RL (+ the optional terms the loss config turns on) from the weighted
    terms :func:`quietstar_loss` returns: the one place the objective is summed."""
    return sum(terms.values())


def quietstar_loss(
    base_logits,
    mixed_logits,
    sample_logits,
    thoughts,
    mixing_weights,
    labels,
    position_valid,
    loss_config: QuietStarLossConfig | None = None,
    *,
    thought_logits=None,
    sample_temperature: float = 1.0,
):
    """The whole Quiet-STaR objective L = L_NLL + gamma * L_thought + lambda * L_RL, its terms and its metrics,
    weighed by ``loss_config`` (default: the recipe, ``QuietStarLossConfig()``).

    base_logits ``[B, L, V]``, mixed_logits ``[B, N, L, A, V]``, sample_logits ``[B, N, L, T, V]``
    (the thought-token-masked logits each c_{j,m} was sampled from), thoughts ``[B, N, L, T]``,
    mixing_weights ``[B, N, L, A]`` (weight on the thought path), labels ``[B, L]``,
    position_valid ``[B, L]``; thought_logits ``[B, N, L, A, V]`` (lm_head(h_thought), thought-token-masked) is
    needed when ``reward_source="thought"`` or ``thought_nll_weight > 0``; ``sample_temperature``: the temperature
    the thoughts were sampled at (for the entropy diagnostic).
    Returns ``(loss, metrics, terms)``: metrics a dict of floats, terms the weighted losses ``{"nll",
    "thought_nll", "policy"}`` and, with the prior, ``"mixing_prior"`` (tensors) whose :func:`total_loss` is ``loss`` (a trainer measures each one's
    gradient).
    """
    cfg = QuietStarLossConfig() if loss_config is None else loss_config
    if cfg.needs_thought_logits and thought_logits is None:
        raise ValueError(f"reward_source={cfg.reward_source!r} with thought_nll_weight={cfg.thought_nll_weight} and "
                         f"mixing_prior_weight={cfg.mixing_prior_weight} needs thought_logits (the thought path's own "
                         "predictions); pass them.")
    num_lookahead = mixed_logits.shape[-2]
    targets, target_valid = lookahead_targets(labels, position_valid, num_lookahead)
    base_nll = token_nll(base_logits, targets[..., 0])
    mixed_nll = token_nll(mixed_logits, targets[:, None].expand(mixed_logits.shape[:-1]))
    nll, per_step = nll_loss(base_nll, target_valid[..., 0], mixed_nll, target_valid, cfg.base_loss_weight)
    needs_thought = cfg.needs_thought_logits
    thought_nll = (token_nll(thought_logits, targets[:, None].expand(thought_logits.shape[:-1])) if needs_thought
                   else None)
    thought_term = per_step_nll(thought_nll, target_valid).mean() if needs_thought else nll.new_zeros(())
    reward, reward_valid = rewards(thought_nll if cfg.reward_source == "thought" else mixed_nll, target_valid)
    advantage = advantages(reward, cfg.clip_negative_advantage, cfg.advantage_normalization, cfg.advantage_std_floor,
                           reward_valid)
    logprobs = thought_logprobs(sample_logits, thoughts, cfg.reinforce_temperature)
    rl = policy_loss(logprobs, advantage, reward_valid)
    terms = {"nll": nll, "thought_nll": cfg.thought_nll_weight * thought_term, "policy": cfg.policy_weight * rl}
    prior = None
    if cfg.mixing_prior_weight > 0:
        prior = mixing_prior(mixing_weights, thought_nll, base_nll_ahead(base_nll, num_lookahead), target_valid)
        terms["mixing_prior"] = cfg.mixing_prior_weight * prior
    loss = total_loss(terms)

    with torch.no_grad():
        valid = reward_valid[:, None].expand_as(reward)
        raw_advantage = reward - reward.mean(dim=1, keepdim=True)
        tied = (reward == reward[:, :1]).all(dim=1)  # [B, L]: every thought of the position scored alike
        live_weights = mixing_weights[:, :, :, 0][valid]
        metrics = {
            "loss": loss.item(),
            "nll_loss": nll.item(),
            "thought_nll_loss": thought_term.item(),
            "policy_loss": rl.item(),
            "base_nll": masked_mean(base_nll, target_valid[..., 0]).item(),
            "reward_mean": reward[valid].mean().item() if valid.any() else 0.0,
            "reward_std": reward[valid].std().item() if valid.sum() > 1 else 0.0,
            "positive_advantage_fraction": (raw_advantage[valid] > 0).float().mean().item() if valid.any() else 0.0,
            "tied_reward_fraction": tied[reward_valid].float().mean().item() if reward_valid.any() else 0.0,
            "mixing_weight_mean": masked_mean(mixing_weights.float(), target_valid[:, None]).item(),
            "zero_mixing_weight_fraction": (live_weights == 0).float().mean().item() if live_weights.numel() else 0.0,
            "thought_entropy": sampling_entropy(sample_logits, sample_temperature, reward_valid),
        }
        for s, value in enumerate(per_step.tolist()):
            metrics[f"mixed_nll_{s}"] = value
        if prior is not None:
            metrics["mixing_prior_loss"] = prior.item()
    return loss, metrics, terms
