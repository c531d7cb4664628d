"""The thought sampler draws from softmax(logits / temperature) and never from a masked token."""

from __future__ import annotations

import torch

from quietstar.thoughts import draw


def test_draw_matches_the_distribution_at_its_temperature():
    logits = torch.tensor([2.0, 0.5, float("-inf"), -1.0, 1.0])
    temperature, rows = 1.7, 200_000
    probs = torch.softmax(logits / temperature, dim=-1)
    samples = draw(logits.expand(rows, -1), temperature, greedy=False, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(samples, minlength=5).double()
    assert counts[2] == 0
    # Each count is Binomial(rows, p): |z| < 5 has a false-alarm rate below 1e-5 over the five entries.
    z = (counts - rows * probs) / (rows * probs * (1 - probs)).sqrt().clamp(min=1e-9)
    assert z[probs > 0].abs().max() < 5, z
    # A sampler that ignored the temperature would fail the same test.
    wrong = torch.softmax(logits, dim=-1)
    z_wrong = (counts - rows * wrong) / (rows * wrong * (1 - wrong)).sqrt().clamp(min=1e-9)
    assert z_wrong[wrong > 0].abs().max() > 5


def test_draw_is_reproducible_and_greedy_is_the_argmax():
    logits = torch.randn(7, 3, 11)
    first = draw(logits, 1.0, False, torch.Generator().manual_seed(5))
    assert torch.equal(first, draw(logits, 1.0, False, torch.Generator().manual_seed(5)))
    assert first.shape == (7, 3)
    assert torch.equal(draw(logits, 1.0, True, None), logits.argmax(-1))
