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
    steps = out.thoughts.shape[1]  # 6, or fewer where every row ended (random models emit the eos, 256, too)
    assert steps == int(out.lengths.max()) <= 6
    assert out.sequences.shape == (2, 7 + steps) and out.thoughts.shape == (2, steps, 4)
    assert not torch.isin(out.thoughts, torch.tensor(model.thought_token_ids)).any()
    for b in range(2):
        n = int(out.lengths[b])
        prompt = ids[b][mask[b].bool()][None]
        sequence, _, logits = generate_reference(model, prompt, out.thoughts[b : b + 1, :n])
        assert torch.equal(sequence[0, prompt.shape[1]:], out.sequences[b, 7 : 7 + n])
        torch.testing.assert_close(out.logits[b, :n], logits[0], rtol=1e-5, atol=1e-5)
        assert (out.sequences[b, 7 + n :] == model.pad_token_id).all()  # a row that ended first is padded


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
    out = model.generate(ids, mask, max_new_tokens=4, eos_token_id=[])  # the loop below does not stop at EOS either
    sequence = ids
    for _ in range(4):
        logits = model.base(input_ids=sequence).logits[:, -1]
        logits[:, list(model.thought_token_ids)] = float("-inf")
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, sequence)


def first_end(tokens: torch.Tensor, eos: list[int]) -> int:
    """How many of ``tokens [M]`` a row keeps: up to and including the first one in ``eos`` (all when none is)."""
    hits = [i for i, token in enumerate(tokens.tolist()) if token in eos]
    return hits[0] + 1 if hits else len(tokens)


def test_generation_stops_once_every_row_has_ended_and_pads_rows_that_ended_first():
    """The eos ids are tokens the rows say anyway (without stopping, eos_token_id=[]), so with the same thoughts the
    rows end at known steps: generation stops at the step the last row ends, not at max_new_tokens."""
    model = make_model("llama", num_thought_tokens=3)
    randomize_mixing_head(model, scale=2.0)
    ids, mask = padded_batch(lengths=(6, 4, 5), left_padding_rows=(1, 2))
    free = model.generate(ids, mask, max_new_tokens=9, generator=torch.Generator().manual_seed(2), eos_token_id=[])
    assert free.sequences.shape == (3, 6 + 9) and (free.lengths == 9).all()  # [] never stops
    said = free.sequences[:, 6:]
    eos = [int(said[0, 1]), int(said[1, 3]), int(said[2, 4])]  # each row ends by its 2nd, 4th, 5th token at the latest
    out = model.generate(ids, mask, max_new_tokens=9, thoughts=free.thoughts, eos_token_id=eos)
    lengths = [first_end(said[b], eos) for b in range(3)]
    assert out.lengths.tolist() == lengths and max(lengths) < 9
    assert out.sequences.shape == (3, 6 + max(lengths)) and out.thoughts.shape == (3, max(lengths), 3)
    assert len(set(lengths)) > 1  # some row ended before the last one did: its padding is checked below
    for b, n in enumerate(lengths):
        assert torch.equal(out.sequences[b, : 6 + n], free.sequences[b, : 6 + n])
        assert int(out.sequences[b, 5 + n]) in eos or n == max(lengths)
        assert (out.sequences[b, 6 + n :] == model.pad_token_id).all()
        assert torch.equal(out.thoughts[b, :n], free.thoughts[b, :n])
        assert (out.thoughts[b, n:] == model.pad_token_id).all()  # no thought is shown for the padding
        new, thoughts, weights = out.row(b)
        assert torch.equal(new, said[b, :n]) and thoughts.shape == (n, 3) and weights.shape == (n,)
        # The slow definition stops at the same token.
        prompt = ids[b][mask[b].bool()][None]
        sequence, _, _ = generate_reference(model, prompt, free.thoughts[b : b + 1], eos_token_id=eos)
        assert torch.equal(sequence[0, prompt.shape[1]:], said[b, :n])


def test_the_tokenizers_eos_is_the_default_and_no_known_eos_never_stops():
    from quietstar.generation import eos_token_ids

    model = make_model("llama")
    assert eos_token_ids(model) == [model.tokenizer.eos_token_id] == [256]
    assert eos_token_ids(model, 7) == [7] and eos_token_ids(model, [7, 9]) == [7, 9] and eos_token_ids(model, []) == []
    model.tokenizer.eos_token = None
    model.base.generation_config.eos_token_id = [3, 4]  # then the LM's generation config
    assert eos_token_ids(model) == [3, 4]
    model.base.generation_config.eos_token_id = None
    assert eos_token_ids(model) == []
    ids, mask = padded_batch(lengths=(5,), left_padding_rows=())
    out = model.generate(ids, mask, max_new_tokens=5)
    assert out.sequences.shape == (1, 10) and out.lengths.tolist() == [5]


def test_rendering_shows_nothing_past_the_end_of_sequence():
    from quietstar.visualize import render_html, render_terminal

    model = make_model("llama", num_thought_tokens=2)
    randomize_mixing_head(model, scale=2.0)
    ids, mask = padded_batch(lengths=(5, 5), left_padding_rows=())
    free = model.generate(ids, mask, max_new_tokens=6, generator=torch.Generator().manual_seed(3), eos_token_id=[])
    eos = int(free.sequences[0, 6])  # row 0's 2nd token ends it
    out = model.generate(ids, mask, max_new_tokens=6, thoughts=free.thoughts, eos_token_id=eos)
    n = int(out.lengths[0])
    assert n == first_end(free.sequences[0, 5:], [eos]) and n < out.thoughts.shape[1]  # row 0 ended first
    new, thoughts, weights = out.row(0)
    text = render_terminal(model.tokenizer, ids[0], new, thoughts, color=False)
    assert text.count("[") == n  # one thought per token up to the EOS, none for the padding
    expected_tail = f"[{model.tokenizer.decode(thoughts[-1].tolist())}]{model.tokenizer.decode([eos])}"
    assert text.endswith(expected_tail)  # the EOS and its thought are the last thing shown
    page = render_html(model.tokenizer, ids[0], new, thoughts, weights)
    assert page.count('class="thought"') == n


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
