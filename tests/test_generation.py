"""Thought-aware generation: the cached fast path equals the recompute-everything definition."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model, padded_batch, randomize_mixing_head
from quietstar.generation import generate_reference


# granite: scaled logits, gemma2: soft-capped logits (quietstar.head) and scores, local and global layers;
# mistral_window: a window shorter than prompt + thought; deepseek_v3: values with their own head dim (MLA);
# roberta: an output head with a transform before the projection, positions from padding_idx + 1; electra: a head
# in two parts, hidden states wider than the embeddings; gpt_oss: sinks;
# llama4_text: a decoder that get_decoder() does not return.
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "granite", "gemma2", "mistral_window", "deepseek_v3",
                                  "roberta", "electra", "gpt_oss", "llama4_text"])
@pytest.mark.parametrize("mixing", ["logits", "logprobs"])
def test_cached_generation_equals_the_slow_definition(arch, mixing):
    model = make_model(arch, mixing=mixing, num_thought_tokens=4)
    randomize_mixing_head(model, scale=2.0)
    ids, mask = padded_batch(lengths=(7, 5), left_padding_rows=(1,))
    out = model.generate(ids, mask, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    assert out.sequences.shape == (2, 7 + 6) and out.thoughts.shape == (2, 6, 4)
    assert not torch.isin(out.thoughts, torch.tensor(model.thought_token_ids)).any()
    for b in range(2):
        prompt = ids[b][mask[b].bool()][None]
        sequence, _, logits = generate_reference(model, prompt, out.thoughts[b : b + 1])
        assert torch.equal(sequence[0, prompt.shape[1]:], out.sequences[b, 7:])
        torch.testing.assert_close(out.logits[b], logits[0], rtol=1e-5, atol=1e-5)


def test_replayed_thoughts_reproduce_the_generation_and_thoughts_matter():
    model = make_model("llama", num_thought_tokens=3)
    randomize_mixing_head(model, scale=3.0)
    ids, mask = padded_batch(lengths=(6, 6), left_padding_rows=())
    first = model.generate(ids, mask, max_new_tokens=5, generator=torch.Generator().manual_seed(1))
    replay = model.generate(ids, mask, max_new_tokens=5, thoughts=first.thoughts)
    assert torch.equal(first.sequences, replay.sequences)
    torch.testing.assert_close(first.logits, replay.logits)
    other = model.generate(ids, mask, max_new_tokens=5, thoughts=(first.thoughts + 1) % 256)
    assert not torch.allclose(other.logits[:, 0], first.logits[:, 0])


@pytest.mark.parametrize("arch", ["llama", "granite", "gemma2"])
def test_with_a_zero_mixing_head_generation_is_the_base_models_greedy_decoding(arch):
    model = make_model(arch)
    ids, mask = padded_batch(lengths=(6, 6), left_padding_rows=())
    out = model.generate(ids, mask, max_new_tokens=4)
    sequence = ids
    for _ in range(4):
        logits = model.base(input_ids=sequence).logits[:, -1]
        logits[:, list(model.thought_token_ids)] = float("-inf")
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, sequence)


def test_finished_rows_keep_emitting_eos():
    model = make_model("llama")
    randomize_mixing_head(model)
    ids, mask = padded_batch(lengths=(6, 6), left_padding_rows=())
    free = model.generate(ids, mask, max_new_tokens=4, generator=torch.Generator().manual_seed(2))
    eos = int(free.sequences[0, 6])  # the first token row 0 produces
    out = model.generate(ids, mask, max_new_tokens=4, thoughts=free.thoughts, eos_token_id=eos)
    assert (out.sequences[0, 6:] == eos).all()


def test_sampled_thoughts_follow_the_same_distribution_as_the_slow_definition():
    """With greedy thoughts both paths must think exactly the same thoughts and say the same tokens."""
    model = make_model("qwen2", num_thought_tokens=3)
    randomize_mixing_head(model, scale=2.0)
    ids, mask = padded_batch(lengths=(6,), left_padding_rows=())
    fast = model.generate(ids, mask, max_new_tokens=4, greedy_thoughts=True)
    sequence, thoughts, logits = generate_reference(model, ids, max_new_tokens=4, greedy_thoughts=True)
    assert torch.equal(fast.thoughts, thoughts)
    assert torch.equal(fast.sequences, sequence)
    torch.testing.assert_close(fast.logits, logits, rtol=1e-5, atol=1e-5)


def test_generate_script_shows_thoughts_and_writes_html(tmp_path):
    import os
    import subprocess
    import sys

    model = make_model("llama", num_thought_tokens=2)
    model.save_pretrained(tmp_path / "model")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    page = tmp_path / "thoughts.html"
    result = subprocess.run(
        [sys.executable, os.path.join(repo, "scripts", "generate.py"), "--model", str(tmp_path / "model"),
         "--prompt", "1 + 2 =", "--max-new-tokens", "3", "--show-thoughts", "--html", str(page)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("1 + 2 =") and result.stdout.count("[") >= 3  # one [thought] per token
    assert "\033[" not in result.stdout  # not a terminal: no colour codes
    text = page.read_text()
    assert text.count('class="thought"') == 3 and "mixing weight" in text


@pytest.mark.parametrize("capacity", [1, 5, 64])
def test_buffered_cache_layer_matches_transformers_dynamic_layer(capacity):
    """Appends and crops in any order, across buffer growth (capacity 1 and 5 force it), read the same K/V."""
    from transformers.cache_utils import DynamicLayer

    from quietstar.generation import _BufferedLayer

    ours, theirs = _BufferedLayer(capacity), DynamicLayer()
    g = torch.Generator().manual_seed(0)
    for action in [3, 1, -2, 4, 1, -1, -3, 7, 2, -9, 5]:
        if action > 0:
            k, v = torch.randn(2, 3, action, 4, generator=g), torch.randn(2, 3, action, 5, generator=g)
            for layer in (ours, theirs):
                keys, values = layer.update(k, v)
        else:
            ours.crop(action)
            theirs.crop(action)
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        assert ours.get_seq_length() == theirs.get_seq_length()
    assert ours.keys.shape == (2, 3, ours.get_seq_length(), 4)
