"""The official Quiet-STaR execution scheme, re-implemented: a dense baseline and an independent oracle.

The official code (ezelikman/quiet-star, ``modeling_mistral.py``) computes one training step as
K = T + A + 2 sequential full passes of the plain model over B*N rows (every text row repeated once
per thought sample), all in one autograd graph:

* pass 0 feeds the text x_0..x_{L-1} (the base pass, computed N times over);
* pass k = 1..S feeds branch token k of every position at once: <|startofthought|>, c_1..c_T,
  <|endofthought|>, x_{j+1}..x_{j+A-1} (S = T + A + 1), at position id pos_j + k.

Every pass appends its L keys/values to a growing KV cache (transformers' ``DynamicCache``, which
concatenates) and an L x L diagonal block to a growing dense additive float mask of shape
``[B*N, 1, L, L*(k+1)]``: the token of pass k at position j sees the text x_0..x_j and the tokens
of passes 1..k at position j, nothing else. Thought token c_m is drawn (without gradient) from the
output of pass m, and that output's logits are the ones the policy loss scores. Attention work is
O(L^2 K^2) and the K/V saved for the backward grow as O(L K^2) per layer.

This module is written from that description (not copied from the official code) and computes the
same loss as ``QuietStarForCausalLM.forward``: given the same thoughts, every pass produces the
hidden states our single expanded pass produces, and the mixing head, the family's head (``head_logits``) and
``quietstar.losses.quietstar_loss`` turn them into the loss exactly as ``forward`` does. It is
therefore both the baseline of ``bench/step.py`` and an oracle for the fast path
(``tests/test_official_dense.py``). Training never calls it; it lives in the package so that the tests
and the benchmarks import one copy plainly.

Deliberate differences from the official code, none of which changes the cost structure: token
embeddings are gathered (the official code multiplies one-hot rows by the embedding matrix), thoughts
are drawn with :func:`quietstar.thoughts.draw` at ``thought_temperature`` (the official
``gumbel_softmax`` ignores its temperature), and the visibility and position rules are ours
(docs/design.md §1), so a padded row behaves like its unpadded self. Sliding-window layers get their window
in the mask (one mask per layer type where local and global layers mix), on positions as the family does.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache

from .modeling import QuietStarForCausalLM, QuietStarOutput
from .thoughts import draw
from .vocab import mask_thought_tokens

PLAIN_ATTENTIONS = ("eager", "sdpa")


@contextlib.contextmanager
def plain_attention(model: QuietStarForCausalLM, implementation: str = "sdpa"):
    """Run ``model.base`` with one of transformers' own attentions (which take a dense 4-D mask) inside the block."""
    if implementation not in PLAIN_ATTENTIONS:
        raise ValueError(f"implementation must be one of {PLAIN_ATTENTIONS}, got {implementation!r}.")
    previous = model.base.config._attn_implementation
    model.base.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        model.base.set_attn_implementation(previous)


def lookahead_tokens(input_ids: torch.Tensor, num_lookahead: int, pad_token_id: int) -> torch.Tensor:
    """The teacher-forced branch tokens x_{j+1}..x_{j+A-1} of every position: ``[B, L, A-1]`` (pad past the row)."""
    B, L = input_ids.shape
    index = torch.arange(L, device=input_ids.device)[:, None] + torch.arange(1, num_lookahead, device=input_ids.device)
    tokens = input_ids.gather(1, index.clamp(max=L - 1).view(1, -1).expand(B, -1)).view(B, L, num_lookahead - 1)
    return tokens.masked_fill(index >= L, pad_token_id)


def pass_visibility(key_padding: torch.Tensor, positions: torch.Tensor, k: int, window: int | None) -> torch.Tensor:
    """Who the tokens of pass k see: ``[R, L, L * (k + 1)]`` bool over the text keys and the keys of passes 1..k.

    The token of pass k at index j (position pos_j + k) sees the text x_i for i <= j and the tokens of passes
    1..k at index j; in a sliding-window layer only keys whose position lies less than ``window`` behind its own
    (the family's rule, on positions: pos_j + k - pos_i < window for the text, k - k' < window for pass k').
    ``key_padding [R, L]`` hides padded text keys; ``positions [R, L]`` are the text positions.
    """
    L = key_padding.shape[-1]
    index = torch.arange(L, device=key_padding.device)
    text = (index[None, :, None] >= index[None, None, :]) & key_padding[:, None, :]
    own = (index[:, None] == index[None, :]).expand_as(text)
    if window is not None:
        text = text & (positions[:, :, None] + k - positions[:, None, :] < window)
    blocks = [text] + [own if window is None or k - earlier < window else torch.zeros_like(own)
                       for earlier in range(1, k + 1)]
    return torch.cat(blocks, dim=-1)


def additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool visibility ``[R, Q, K]`` as the additive mask transformers' attentions take: ``[R, 1, Q, K]``."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min).unsqueeze(1)


def layer_windows(config) -> tuple[int | None, bool]:
    """The family's sliding window and whether it is mixed with global layers: ``(window, mixed)``.

    Local and global layers mixed (``layer_types``) take one mask per layer type, a dict the family's model
    hands each layer; a window on every layer (Mistral) takes one windowed mask.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = set(getattr(config, "layer_types", None) or ())
    unknown = layer_types - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"dense_forward builds masks for full and sliding-window layers only; this family also has "
                         f"{sorted(unknown)} layers. Use QuietStarForCausalLM.forward for it.")
    if window is None or layer_types == {"full_attention"}:
        return None, False
    return window, layer_types == {"full_attention", "sliding_attention"}


def pass_mask(key_padding, positions, k: int, config, dtype):
    """The attention mask of pass k for ``model.body``: one additive mask, or one per layer type."""
    window, mixed = layer_windows(config)
    if not mixed:
        return additive(pass_visibility(key_padding, positions, k, window), dtype)
    return {"full_attention": additive(pass_visibility(key_padding, positions, k, None), dtype),
            "sliding_attention": additive(pass_visibility(key_padding, positions, k, window), dtype)}


def dense_passes(model: QuietStarForCausalLM, input_ids, key_padding, thoughts=None, generator=None):
    """The K = T + A + 2 sequential passes over B*N rows, with gradient.

    ``thoughts [B, N, L, T]`` replays given thoughts; ``None`` draws them pass by pass.
    Returns ``text_hidden [B, N, L, D]`` (the N identical copies of the base pass),
    ``sample_logits [B, N, L, T, V]`` (thought-token-masked logits of passes 1..T, the
    distributions c_1..c_T are drawn from), ``thought_hidden [B, N, L, A, D]`` (passes T+2..S)
    and the thoughts ``[B, N, L, T]``.
    """
    cfg = model.quietstar_config
    B, L = input_ids.shape
    N, T, A, S = cfg.num_thoughts, cfg.num_thought_tokens, cfg.num_lookahead_tokens, cfg.branch_length
    sot, eot = model.thought_token_ids
    rows = B * N  # row b * N + n is thought sample n of text row b
    given = None if thoughts is None else thoughts.reshape(rows, L, T)
    drawn = []  # c_1, c_2, ... as they are drawn: [B*N, L] each
    lookahead = lookahead_tokens(input_ids, A, model.pad_token_id).repeat_interleave(N, dim=0)  # [B*N, L, A-1]
    positions = model.text_positions(key_padding).repeat_interleave(N, dim=0)
    row_padding = key_padding.bool().repeat_interleave(N, dim=0)
    dtype = model.lm_head.weight.dtype

    # Full-length cache layers for every layer: a family's sliding-window cache layer would drop the keys that
    # the masks above hide or show themselves.
    cache = DynamicCache()
    tokens = input_ids.repeat_interleave(N, dim=0)
    sample_logits, thought_hidden = [], []
    for k in range(S + 1):
        hidden = model.body(
            inputs_embeds=model.embed(tokens),
            attention_mask=pass_mask(row_padding, positions, k, model.base.config, dtype),  # [B*N, 1, L, L*(k+1)]
            position_ids=positions + k,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state  # [B*N, L, D]
        if k == 0:
            text_hidden = hidden
        elif k <= T:  # pass k holds b_{j,k}, whose output predicts c_k
            logits = mask_thought_tokens(model.head_logits(hidden), model.thought_token_ids)
            sample_logits.append(logits)
            if given is None:
                drawn.append(draw(logits.detach(), cfg.thought_temperature, False, generator))
        elif k >= T + 2:  # <|endofthought|> and the teacher-forced tokens: h^thought_{j, k-T-2}
            thought_hidden.append(hidden)
        # The token every position feeds to the next pass.
        if k == 0:
            tokens = torch.full_like(tokens, sot)
        elif k <= T:
            tokens = drawn[k - 1] if given is None else given[..., k - 1]
        elif k == T + 1:
            tokens = torch.full_like(tokens, eot)
        elif k < S:
            tokens = lookahead[..., k - T - 2]

    if given is None:
        thoughts = torch.stack(drawn, dim=-1).view(B, N, L, T)
    D, V = text_hidden.shape[-1], sample_logits[0].shape[-1]
    return (
        text_hidden.view(B, N, L, D),
        torch.stack(sample_logits, dim=2).view(B, N, L, T, V),
        torch.stack(thought_hidden, dim=2).view(B, N, L, A, D),
        thoughts,
    )


def dense_forward(model: QuietStarForCausalLM, input_ids, attention_mask=None, labels=None, thoughts=None,
                  generator=None) -> QuietStarOutput:
    """``QuietStarForCausalLM.forward`` computed the official way; returns loss, metrics, logits and thoughts.

    ``model.base`` must run one of transformers' own attentions (wrap the call in :func:`plain_attention`).
    """
    implementation = model.base.config._attn_implementation
    if implementation not in PLAIN_ATTENTIONS:
        raise ValueError(f"dense_forward needs model.base on one of {PLAIN_ATTENTIONS} (it passes a dense 4-D mask), "
                         f"not {implementation!r}; wrap the call in `with plain_attention(model):`.")
    cfg = model.quietstar_config
    A = cfg.num_lookahead_tokens
    L = input_ids.shape[1]
    key_padding = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    text_hidden, sample_logits, thought_hidden, thoughts = dense_passes(model, input_ids, key_padding, thoughts,
                                                                        generator)

    # The N copies of the base pass are identical; averaging their logits keeps each copy in the graph,
    # as the official per-row base loss does, and gives the same values and parameter gradients.
    base_logits = model.head_logits(text_hidden).mean(dim=1)  # [B, L, V]
    shifted = (torch.arange(L, device=input_ids.device)[:, None] + torch.arange(A, device=input_ids.device))
    shifted = shifted.clamp(max=L - 1)  # h^base_{j+s}; out-of-row entries are never scored
    base_hidden = text_hidden[:, :, shifted]  # [B, N, L, A, D], sample n mixes with its own base copy
    weights, mixed = model.mix_predictions(base_hidden, thought_hidden, base_logits[:, shifted].unsqueeze(1))
    out = QuietStarOutput(base_logits=base_logits, mixing_weights=weights, logits=mixed, thoughts=thoughts)
    if labels is not None:
        thought_logits = mask_thought_tokens(model.head_logits(thought_hidden), model.thought_token_ids)
        out.loss, out.metrics, out.loss_terms = model.objective(base_logits, mixed, sample_logits, thoughts, weights,
                                                                labels, key_padding, thought_logits)
        out.metrics["mixing_head_live_units"] = model.mixing_head.live_unit_fraction(base_hidden, thought_hidden)
    return out
