"""The family's output head (quietstar.head): scaled and soft-capped logits wherever logits come from hidden states."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model, padded_batch, randomize_mixing_head, transformers_eager
from quietstar.head import LogitTransform
from quietstar.mixing import mix

FAMILIES = ["llama", "granite", "cohere", "gemma2"]


def test_transform_reads_each_familys_fields():
    class Config:
        pass

    granite, cohere, gemma = Config(), Config(), Config()
    granite.logits_scaling, cohere.logit_scale, gemma.final_logit_softcapping = 8.0, 0.25, 30.0
    assert LogitTransform.from_config(granite) == LogitTransform(scale=0.125)
    assert LogitTransform.from_config(cohere) == LogitTransform(scale=0.25)
    assert LogitTransform.from_config(gemma) == LogitTransform(softcap=30.0)
    assert LogitTransform.from_config(Config()) == LogitTransform() and LogitTransform().is_affine
    z = torch.tensor([-100.0, -1.0, 0.0, 2.0, 100.0])
    torch.testing.assert_close(LogitTransform(scale=0.5, softcap=10.0)(z), 10.0 * torch.tanh(z * 0.5 / 10.0))


@pytest.mark.parametrize("arch", FAMILIES)
def test_base_logits_are_the_familys_own(arch):
    model = make_model(arch)
    ids, mask = padded_batch(lengths=(9, 9), left_padding_rows=())
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        with transformers_eager(model):
            own = model.base(input_ids=ids).logits
    torch.testing.assert_close(out.base_logits, own, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("mixing", ["logits", "logprobs"])
def test_mixed_logits_mix_the_familys_logits(arch, mixing):
    # Under soft-capping the head is not affine: mixing hidden states (the shortcut for an affine head) would differ.
    model = make_model(arch, mixing=mixing)
    randomize_mixing_head(model, scale=2.0)
    ids, mask = padded_batch(lengths=(9, 7))
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    A, L = model.quietstar_config.num_lookahead_tokens, ids.shape[1]
    shifted = (torch.arange(L)[:, None] + torch.arange(A)).clamp(max=L - 1)
    expected = mix(out.base_logits[:, shifted].unsqueeze(1), out.thought_logits, out.mixing_weights, mixing)
    expected[..., list(model.thought_token_ids)] = float("-inf")
    torch.testing.assert_close(out.logits, expected.to(out.logits.dtype), rtol=1e-5, atol=1e-5)
