"""Quiet-STaR losses as plain functions of tensors (docs/design.md §1, "Losses").

Shapes: B batch, N thought samples, L text positions, A lookahead tokens, T thought tokens, V vocab.
A target is valid when it exists (inside the row) and is neither padding nor ignored (-100).
With anchors (thinking at a fraction of the positions, quietstar.anchors) the thought-side tensors hold M anchor
slots in place of the L positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .anchors import UNUSED, at_anchors, into_positions
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
               position_valid: torch.Tensor | None = None,
               proposal_weights: torch.Tensor | None = None) -> torch.Tensor:
    """r_{j,n} = R_{j,n} - mean_n R_{j,n} ``[B, N, L]``; with ``normalization="batch_std"`` divided by the batch's
    standard deviation of r over valid positions ``[B, L]`` (at least ``std_floor``); clipped at 0 when
    ``clip_negative``. Centred and unclipped, E[r | thought tokens] = 0 when rewards carry no information.
    ``proposal_weights [B, N, L]`` (importance weights of hindsight proposals, quietstar.hindsight): the mean and the
    standard deviation are weighted by them, so that they estimate the policy's."""
    if proposal_weights is None:
        advantage = reward - reward.mean(dim=1, keepdim=True)
    else:
        total = proposal_weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(reward.dtype).tiny)
        advantage = reward - (proposal_weights * reward).sum(dim=1, keepdim=True) / total
    if normalization == "batch_std":
        valid = (torch.ones_like(reward[:, 0], dtype=torch.bool) if position_valid is None else position_valid)
        square = advantage.square() if proposal_weights is None else proposal_weights * advantage.square()
        spread = masked_mean(square, valid[:, None]).sqrt()  # r is centred: its RMS is its std
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


def check_anchored_loss(loss_config: QuietStarLossConfig, anchors) -> None:
    """Refuse the position-contrastive reward for thoughts at anchors (``anchors`` not None): it replays every thought
    at a later position, which anchors lack."""
    if anchors is not None and loss_config.contrastive_reward_weight > 0:
        raise ValueError("contrastive_reward_weight > 0 moves every thought to a later position, which thinking at "
                         "anchor positions only (thought_fraction < 1) does not have; set one of them off.")


def anchor_targets(targets: torch.Tensor, target_valid: torch.Tensor, anchors: torch.Tensor):
    """The lookahead targets ``[B, L, A]`` and their validity at each anchor slot of ``anchors [B, M]``: ``[B, M, A]``
    each; an unused slot's targets are never valid."""
    valid = at_anchors(target_valid, anchors) & (anchors != UNUSED)[..., None]
    return at_anchors(targets, anchors), valid


def mixing_prior(weights: torch.Tensor, path_nll: torch.Tensor, base_nll: torch.Tensor,
                 valid: torch.Tensor) -> torch.Tensor:
    """L_prior = mean over valid (b, n, j, s) of w_{j,s} * max(0, l_path - l_base), NLLs detached: it pulls w towards 0
    exactly where the compared prediction does not beat the base one, and is zero where it does.

    ``path_nll`` is the reference's NLL (``mixing_prior_reference``). The thought path alone ('thought'): with logit
    mixing and w in [0, 1] (convexity of the NLL in the logits) it bounds how much mixing can cost over the base
    model, l_mix - l_base <= w (l_thought - l_base) <= w max(0, l_thought - l_base). The mixed prediction ('mixed'):
    l_mix - l_base is itself about w times the thought path's excess, so the pull grows with w and vanishes at w = 0.

    weights/path_nll ``[B, N, L, A]``, base_nll ``[B, L, A]`` (:func:`base_nll_ahead`), valid ``[B, L, A]``.
    """
    excess = (path_nll.detach() - base_nll.detach()[:, None]).clamp(min=0)
    return masked_mean(weights * excess, valid[:, None])


class _CategoricalEntropy(torch.autograd.Function):
    """H(softmax(z)) of each row of ``z [..., V]`` -> ``[...]``, with dH/dz_k = -p_k (z_k - E_p[z]). It keeps only z
    for the backward: autograd through log_softmax, exp and a product would keep three more ``[..., V]`` tensors,
    gigabytes over the B * N * L * T rows of a training batch at a 49k vocabulary. Logits of -inf (masked tokens) have
    probability 0 and contribute nothing."""

    @staticmethod
    def forward(ctx, logits):
        log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
        probs = torch.exp(logits - log_norm)
        mean_logit = (probs * torch.where(probs > 0, logits, 0)).sum(dim=-1, keepdim=True)  # 0 * -inf would be NaN
        ctx.save_for_backward(logits, log_norm, mean_logit)
        return (log_norm - mean_logit).squeeze(-1)

    @staticmethod
    def backward(ctx, grad):
        logits, log_norm, mean_logit = ctx.saved_tensors
        probs = torch.exp(logits - log_norm)
        return -grad.unsqueeze(-1) * probs * (torch.where(probs > 0, logits, 0) - mean_logit)


def entropy_loss(sample_logits: torch.Tensor, temperature: float, position_valid: torch.Tensor,
                 proposal_weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_ent = -mean over valid j, all n and m of H(softmax(z_{j,m-1} / tau)), the entropy (nats) of the distribution
    each thought token was drawn from: minimising it keeps the thought policy exploring.

    sample_logits ``[B, N, L, T, V]`` (thought-token-masked, with gradient), tau the sampling temperature,
    position_valid ``[B, L]`` (the positions that take part in L_RL); ``proposal_weights [B, N, L]``: each thought's
    importance weight (hindsight proposals).
    """
    logits = at_least_fp32(sample_logits)
    entropy = _CategoricalEntropy.apply(logits if temperature == 1 else logits / temperature)  # [B, N, L, T]
    if proposal_weights is not None:
        entropy = entropy * proposal_weights[..., None]
    return -masked_mean(entropy, position_valid[:, None, :, None])


def lookahead_base_nll(base_nll: torch.Tensor, target_valid: torch.Tensor) -> torch.Tensor:
    """sum_s l^base_{j+s} over the valid s: the NLL the model without thoughts leaves on the A targets of position j,
    ``[B, L]``; base_nll ``[B, L]`` is l^base_c (the NLL of x_{c+1}), target_valid ``[B, L, A]``."""
    L, A = target_valid.shape[-2:]
    columns = torch.arange(L, device=base_nll.device)
    ahead = (columns[:, None] + torch.arange(A, device=base_nll.device)).clamp(max=L - 1)  # [L, A]: j + s
    return (base_nll[:, ahead] * target_valid).sum(dim=-1)


def moved_gains(moved_nll: torch.Tensor, base_nll: torch.Tensor, target_valid: torch.Tensor, shift: int):
    """The gain of each thought moved ``shift`` positions later: ``[B, N, L]``, and which positions have such a partner
    position ``[B, L]``.

    G^moved_{j,n} = sum_s (l^base_{j'+s} - l^moved_{j',s,n}) with j' = j + shift: how much less the thought c_{j,n},
    replayed after x_0..x_{j'}, leaves to predict of x_{j'+1+s} than the model without a thought. moved_nll
    ``[B, N, L, A]`` is indexed by j' (column j' holds the NLL after the thought sampled at j' - shift), base_nll
    ``[B, L]`` is l^base_c (the NLL of x_{c+1} from the text pass), target_valid ``[B, L, A]``. A position has a
    partner when j' is inside the row and all A of j''s targets are valid.

    Why later, and at least A later: at j' > j the model has read all the text the thought saw, so the thought brings
    nothing there that could not be known; scored earlier it could carry the very tokens it is scored on. From
    j' >= j + A on, the targets x_{j'+1..j'+A} are disjoint from the thought's own x_{j+1..j+A}, so a thought that
    predicts its own targets gains nothing at j' for that.
    """
    L = moved_nll.shape[2]
    gain_here = lookahead_base_nll(base_nll, target_valid)[:, None] - (moved_nll * target_valid[:, None]).sum(dim=-1)
    partner = torch.arange(L, device=moved_nll.device) + shift  # j', where the thought of j is scored
    inside = partner < L
    partner = partner.clamp(max=L - 1)
    has_partner = target_valid.all(dim=-1)[:, partner] & inside
    return gain_here[:, :, partner].masked_fill(~has_partner[:, None], 0), has_partner


def contrastive_rewards(reward: torch.Tensor, moved_gain: torch.Tensor, weight: float) -> torch.Tensor:
    """R'_{j,n} = R_{j,n} - alpha * G^moved_{j,n}: ``reward`` and ``moved_gain`` ``[B, N, L]``.

    R_{j,n} is the base model's reward at j plus the thought's gain there, so R' = R^base_j + G_{j,n} - alpha G^moved:
    with alpha = 1 a thought that helps as much elsewhere as here earns exactly its position's baseline, and its
    advantage is zero.
    """
    return reward - weight * moved_gain


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


def hindsight_metrics(proposal_weights: torch.Tensor, reward: torch.Tensor, position_valid: torch.Tensor,
                      num_hindsight: int) -> dict:
    """Diagnostics of hindsight proposals over the valid positions ``[B, L]``: the mean importance weight of the
    proposals' thoughts and of the policy's (``proposal_weights [B, N, L]``, the first ``num_hindsight`` of N the
    proposals), the effective sample size per position as a fraction of N, and how much more reward ``[B, N, L]`` a
    proposal's thought earns than a policy thought of the same position (> 0: hindsight finds better thoughts)."""
    if not position_valid.any():
        return {}
    rho = proposal_weights.float().permute(0, 2, 1)[position_valid]  # [valid positions, N]
    rewards_here = reward.float().permute(0, 2, 1)[position_valid]
    effective = rho.sum(dim=1).square() / rho.square().sum(dim=1).clamp(min=torch.finfo(rho.dtype).tiny)
    return {
        "hindsight_weight_mean": rho[:, :num_hindsight].mean().item(),
        "hindsight_policy_thought_weight_mean": rho[:, num_hindsight:].mean().item(),
        "hindsight_effective_fraction": (effective / rho.shape[1]).mean().item(),
        "hindsight_reward_gain": (rewards_here[:, :num_hindsight].mean(dim=1)
                                  - rewards_here[:, num_hindsight:].mean(dim=1)).mean().item(),
    }


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
    moved_nll=None,
    anchors=None,
    proposal_weights=None,
):
    """The whole Quiet-STaR objective L = L_NLL + gamma * L_thought + lambda * L_RL, its terms and its metrics,
    weighed by ``loss_config`` (default: the recipe, ``QuietStarLossConfig()``).

    base_logits ``[B, L, V]``, mixed_logits ``[B, N, L, A, V]``, sample_logits ``[B, N, L, T, V]``
    (the thought-token-masked logits each c_{j,m} was sampled from), thoughts ``[B, N, L, T]``,
    mixing_weights ``[B, N, L, A]`` (weight on the thought path), labels ``[B, L]``,
    position_valid ``[B, L]``; thought_logits ``[B, N, L, A, V]`` (lm_head(h_thought), thought-token-masked) is
    needed when ``reward_source="thought"``, ``thought_nll_weight > 0`` or a prior on the thought path
    (``mixing_prior_weight > 0``, ``mixing_prior_reference="thought"``);
    ``sample_temperature``: the temperature the thoughts were sampled at (for the entropy bonus and diagnostic).
    ``contrastive_reward_weight`` alpha > 0 makes the rewards position-contrastive (:func:`contrastive_rewards`) with
    ``moved_nll [B, N, L, A]``, the NLL of the reward source after each thought moved ``contrastive_shift``
    positions later (None: A; :func:`moved_gains`); positions without a partner then take no part in L_RL.
    With ``anchors [B, M]`` (quietstar.anchors) the thought-side tensors (mixed_logits, sample_logits, thoughts,
    mixing_weights, thought_logits) hold the M anchor slots in place of the L positions: L_thought, the rewards, L_RL,
    the prior, the entropy bonus and their metrics run over anchors, and the mixed NLL of every other position is the
    base model's (w = 0 there).
    ``proposal_weights [B, N, L]`` (hindsight proposals, quietstar.hindsight: the first ``hindsight_thoughts`` of each
    position drawn with a view of the next tokens): every per-thought term (the mixed and thought-path NLLs, the
    advantages' mean and spread, L_RL, the prior, the entropy bonus) is weighted by each thought's importance weight,
    so that it estimates the policy's own.
    Returns ``(loss, metrics, terms)``: metrics a dict of floats, terms the weighted losses ``{"nll",
    "thought_nll", "policy"}`` and, when on, ``"mixing_prior"`` and ``"entropy"`` (tensors) whose
    :func:`total_loss` is ``loss`` (a trainer measures each one's gradient).
    """
    cfg = QuietStarLossConfig() if loss_config is None else loss_config
    if cfg.needs_thought_logits and thought_logits is None:
        raise ValueError(f"reward_source={cfg.reward_source!r} with thought_nll_weight={cfg.thought_nll_weight} and "
                         f"mixing_prior_weight={cfg.mixing_prior_weight} needs thought_logits (the thought path's own "
                         "predictions); pass them.")
    check_anchored_loss(cfg, anchors)
    if proposal_weights is not None and anchors is not None:
        raise ValueError("Hindsight proposals (proposal_weights) are drawn at every position, not at anchors.")
    rho = None if proposal_weights is None else proposal_weights.detach()  # [B, N, L]
    num_lookahead = mixed_logits.shape[-2]
    targets, target_valid = lookahead_targets(labels, position_valid, num_lookahead)
    base_nll = token_nll(base_logits, targets[..., 0])
    # What the thoughts are scored on: the targets of every position, or of the anchors.
    branch_targets, branch_valid = ((targets, target_valid) if anchors is None
                                    else anchor_targets(targets, target_valid, anchors))
    mixed_nll = token_nll(mixed_logits, branch_targets[:, None].expand(mixed_logits.shape[:-1]))
    if anchors is None:
        weighted_mixed = mixed_nll if rho is None else mixed_nll * rho[..., None]
        nll, per_step = nll_loss(base_nll, target_valid[..., 0], weighted_mixed, target_valid, cfg.base_loss_weight)
    else:  # away from the anchors the mixed prediction is the base one
        ahead = base_nll_ahead(base_nll, num_lookahead)[:, None].expand(-1, mixed_nll.shape[1], -1, -1)
        nll, per_step = nll_loss(base_nll, target_valid[..., 0], into_positions(ahead, mixed_nll, anchors),
                                 target_valid, cfg.base_loss_weight)
    needs_thought = cfg.needs_thought_logits
    thought_nll = (token_nll(thought_logits, branch_targets[:, None].expand(thought_logits.shape[:-1]))
                   if needs_thought else None)
    thought_term = (per_step_nll(thought_nll if rho is None else thought_nll * rho[..., None], branch_valid).mean()
                    if needs_thought else nll.new_zeros(()))
    reward, reward_valid = rewards(thought_nll if cfg.reward_source == "thought" else mixed_nll, branch_valid)
    if cfg.contrastive_reward_weight > 0:
        if moved_nll is None:
            raise ValueError(f"contrastive_reward_weight={cfg.contrastive_reward_weight} needs moved_nll (the reward "
                             "source's NLL after the thoughts moved to later positions); pass it.")
        shift = cfg.contrastive_distance(num_lookahead)
        own_reward = reward
        moved_gain, has_partner = moved_gains(moved_nll.detach(), base_nll.detach(), target_valid, shift)
        reward = contrastive_rewards(reward, moved_gain, cfg.contrastive_reward_weight)
        reward_valid = reward_valid & has_partner
    advantage = advantages(reward, cfg.clip_negative_advantage, cfg.advantage_normalization, cfg.advantage_std_floor,
                           reward_valid, rho)
    logprobs = thought_logprobs(sample_logits, thoughts, cfg.reinforce_temperature)
    rl = policy_loss(logprobs, advantage if rho is None else advantage * rho, reward_valid)
    terms = {"nll": nll, "thought_nll": cfg.thought_nll_weight * thought_term, "policy": cfg.policy_weight * rl}
    prior = None
    if cfg.mixing_prior_weight > 0:
        base_ahead = base_nll_ahead(base_nll, num_lookahead)
        base_ahead = base_ahead if anchors is None else at_anchors(base_ahead, anchors)
        weighted_w = mixing_weights if rho is None else mixing_weights * rho[..., None]
        reference = thought_nll if cfg.mixing_prior_reference == "thought" else mixed_nll
        prior = mixing_prior(weighted_w, reference, base_ahead, branch_valid)
        terms["mixing_prior"] = cfg.mixing_prior_weight * prior
    entropy_term = None
    if cfg.entropy_bonus_weight > 0:
        entropy_term = entropy_loss(sample_logits, sample_temperature, reward_valid, rho)
        terms["entropy"] = cfg.entropy_bonus_weight * entropy_term
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
            "mixing_weight_mean": masked_mean(mixing_weights.float(), branch_valid[:, None]).item(),
            "zero_mixing_weight_fraction": (live_weights == 0).float().mean().item() if live_weights.numel() else 0.0,
            "thought_entropy": sampling_entropy(sample_logits, sample_temperature, reward_valid),
        }
        for s, value in enumerate(per_step.tolist()):
            metrics[f"mixed_nll_{s}"] = value
        if prior is not None:
            metrics["mixing_prior_loss"] = prior.item()
        if entropy_term is not None:
            metrics["entropy_loss"] = entropy_term.item()  # minus the mean entropy per thought token, all of them
        if cfg.contrastive_reward_weight > 0:
            # A thought's gain where it was sampled and where it was moved: equal when it is generic.
            own_gain = own_reward + lookahead_base_nll(base_nll, target_valid)[:, None]
            metrics["own_gain_mean"] = own_gain[valid].mean().item() if valid.any() else 0.0
            metrics["moved_gain_mean"] = moved_gain[valid].mean().item() if valid.any() else 0.0
        if rho is not None:
            metrics.update(hindsight_metrics(rho, reward, reward_valid, cfg.hindsight_thoughts))
    return loss, metrics, terms
