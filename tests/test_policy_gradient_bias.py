"""The sharpening drift of the official policy loss, and its absence under the recipe (docs/recipe.md).

Rewards that carry no information about the thoughts (independent noise) must give a policy gradient of mean zero:
anything else moves the model whatever its thoughts did. Thoughts are sampled at temperature 1. Scored at tau_RL = 3
with clipped advantages (the official settings) the expected gradient on the logits is E[r+] (p - softmax(z/3)) / 3,
which is not zero; with tau_RL equal to the sampling temperature, or with centred unclipped advantages, it is.

Each case draws many independent positions and z-tests every coordinate of the mean gradient on the logits. With
6 coordinates and |z| < 4.5 the false-alarm rate per case is below 5e-5.
"""

from __future__ import annotations

import pytest
import torch

from quietstar.losses import advantages, policy_loss, thought_logprobs
from quietstar.thoughts import draw

POSITIONS, VOCAB, THOUGHTS = 40_000, 6, 2


def mean_gradient_z(reinforce_temperature: float, clip: bool, normalization: str) -> torch.Tensor:
    """z-statistics ``[V]`` of the per-position policy gradient on the sampling logits."""
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(VOCAB, generator=generator) * 1.5
    logits = z.expand(1, THOUGHTS, POSITIONS, 1, VOCAB).clone().requires_grad_(True)
    thoughts = draw(logits.detach(), 1.0, greedy=False, generator=generator)  # sampled at temperature 1
    reward = torch.randn(1, THOUGHTS, POSITIONS, generator=generator)  # independent of the thoughts
    valid = torch.ones(1, POSITIONS, dtype=torch.bool)
    advantage = advantages(reward, clip, normalization, 0.01, valid)
    loss = policy_loss(thought_logprobs(logits, thoughts, reinforce_temperature), advantage, valid)
    loss.backward()
    per_position = logits.grad[0, :, :, 0].sum(dim=0) * THOUGHTS * POSITIONS  # [L, V]: one draw per position
    return per_position.mean(dim=0) / (per_position.std(dim=0) / POSITIONS**0.5)


@pytest.mark.parametrize("normalization", ["none", "batch_std"])
@pytest.mark.parametrize("reinforce_temperature, clip, drifts", [
    (1.0, False, False),  # the recipe
    (3.0, False, False),  # centred unclipped advantages alone remove the drift
    (1.0, True, False),  # so does scoring at the sampling temperature
    (3.0, True, True),  # the official settings
])
def test_policy_gradient_has_zero_mean_without_information(reinforce_temperature, clip, drifts, normalization):
    z = mean_gradient_z(reinforce_temperature, clip, normalization)
    if drifts:
        assert z.abs().max() > 10, f"the official settings should show the sharpening drift; z = {z.tolist()}"
    else:
        assert z.abs().max() < 4.5, f"the mean policy gradient should be zero; z = {z.tolist()}"


def test_drift_sharpens():
    """The official drift raises the most likely token's logit: the direction the damage went (docs/results.md,
    "Before the recipe")."""
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(VOCAB, generator=generator) * 1.5
    expected = (torch.softmax(z, -1) - torch.softmax(z / 3, -1)) / 3  # -grad of E[-log softmax(z/3)_c], per unit r+
    assert expected[z.argmax()] > 0 and expected[z.argmin()] < 0
    measured = mean_gradient_z(3.0, True, "none")
    assert measured[z.argmax()] < -10  # gradient descent moves against the gradient: the top logit rises
