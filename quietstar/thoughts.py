"""The three phases of a Quiet-STaR step (docs/design.md §2): text pass, no-grad thought sampling, expanded gradient pass.

Shapes: B batch, L text tokens, N thought samples, T thought tokens, A lookahead tokens,
S = T + A + 1 branch tokens, D hidden size, V vocabulary.

Branch of position j (0-based slots): 0 = <|startofthought|>, 1..T = c_{j,1..T},
T+1 = <|endofthought|>, T+2..T+A = x_{j+1}..x_{j+A-1}; slot k has position id pos_j + k + 1.
Slot m-1 predicts c_{j,m} (m = 1..T); slot T+1+s gives h^thought_{j,s}, which predicts x_{j+1+s}.

With ``anchors [B, M]`` (quietstar.anchors: thinking at a fraction of the positions) branches grow at the M anchor
positions of each row only: read L as M in the branch shapes (``[B, N, M, T]`` thoughts, ``[B, N, M, S, D]`` hidden).
"""

from __future__ import annotations

import torch

from .anchors import anchor_columns, anchor_counts, at_anchors, choose_anchors, next_token_entropy
from .attention import ThoughtLayout
from .losses import thought_logprobs
from .vocab import mask_thought_tokens


def draw(logits: torch.Tensor, temperature: float, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``logits [..., V]`` (already thought-token-masked): argmax or a sample at ``temperature``."""
    if greedy:
        return logits.argmax(dim=-1)
    # Inverse-CDF sampling: one uniform per row (torch.multinomial draws one random number per vocabulary
    # entry). A token of probability 0 is never picked: the first CDF entry above u lies on a positive step.
    cdf = torch.softmax(logits.float() / temperature, dim=-1).cumsum_(dim=-1)
    u = torch.rand(logits.shape[:-1], generator=generator, device=logits.device).unsqueeze(-1) * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


@torch.no_grad()
def sample_thoughts(model, input_ids, key_padding, *, temperature=1.0, greedy=False, generator=None,
                    return_logits=False):
    """Sample N thoughts of T tokens at every position: ``[B, N, L, T]`` token ids, no gradient.

    With ``return_logits`` also the thought-token-masked logits each token was drawn from, ``[B, N, L, T, V]``.

    One causal pass over the text fills a per-layer prefix K/V cache; then T steps each feed the
    N*L tokens b_{.,m} at once, writing their K/V into a preallocated branch buffer.
    """
    layout, positions, _ = _text_pass(model, input_ids, key_padding)
    return _sampling_steps(model, layout, positions, temperature, greedy, generator, return_logits)


@torch.no_grad()
def sample_anchored_thoughts(model, input_ids, key_padding, eligible, *, temperature=1.0, greedy=False,
                             generator=None, return_logits=False):
    """Choose each row's anchors and sample N thoughts of T tokens there: ``anchors [B, M]`` and thoughts
    ``[B, N, M, T]`` (with ``return_logits`` also their logits ``[B, N, M, T, V]``), no gradient.

    The anchors are the ceil(q * real tokens) positions of ``eligible [B, L]`` (quietstar.anchors.choose_anchors) where
    the base model's next-token distribution, read from the text pass that fills the prefix cache anyway, has the
    highest entropy; q is the model's ``thought_fraction``.
    """
    layout, positions, hidden = _text_pass(model, input_ids, key_padding)
    layout.anchors = _choose_anchors(model, hidden, key_padding, eligible)
    sampled = _sampling_steps(model, layout, at_anchors(positions, layout.anchors), temperature, greedy, generator,
                              return_logits)
    return (layout.anchors, *sampled) if return_logits else (layout.anchors, sampled)


@torch.no_grad()
def text_anchors(model, input_ids, key_padding, eligible):
    """The anchors ``[B, M]`` :func:`sample_anchored_thoughts` would choose, without sampling (scoring: the views
    place their own thoughts there). One causal text pass."""
    _, _, hidden = _text_pass(model, input_ids, key_padding)
    return _choose_anchors(model, hidden, key_padding, eligible)


def _choose_anchors(model, hidden, key_padding, eligible):
    """Each row's ceil(q * real tokens) ``eligible`` positions of highest next-token entropy of the text pass's final
    hidden states ``[B, L, D]`` (thought tokens masked): ``anchors [B, M]``."""
    entropy = next_token_entropy(mask_thought_tokens(model.head_logits(hidden), model.thought_token_ids))
    fraction = model.quietstar_config.thought_fraction
    return choose_anchors(entropy, eligible, anchor_counts(key_padding, eligible, fraction))


def _text_pass(model, input_ids, key_padding):
    """The causal text pass that fills the prefix K/V cache: its layout, the text's position ids ``[B, L]`` and its
    final hidden states ``[B, L, D]``."""
    positions = model.text_positions(key_padding)
    layout = ThoughtLayout("prefix", key_padding, model.quietstar_config.num_thoughts,
                           num_thought_tokens=model.quietstar_config.num_thought_tokens, attention=model.attention)
    hidden = model.body(inputs_embeds=model.embed(input_ids), position_ids=positions, thought_layout=layout,
                        use_cache=False).last_hidden_state
    return layout, positions, hidden


def _sampling_steps(model, layout, positions, temperature, greedy, generator, return_logits, reach=None,
                    forced=None, return_logprobs=False):
    """T steps of N*P tokens after :func:`_text_pass` (``layout`` holds its cache): thoughts ``[B, N, P, T]``, and with
    ``return_logits`` the logits they were drawn from ``[B, N, P, T, V]``. ``positions [B, P]``: the position ids of
    the P positions that think. ``reach [B, N, P]``: hindsight branches (quietstar.hindsight) that also read the next
    reach tokens of text. ``forced [B, N, P, T]``: feed these thoughts instead of drawing. ``return_logprobs``: also
    each token's log-probability at ``temperature`` ``[B, N, P, T]`` (instead of the logits)."""
    B, P = positions.shape
    N, T = layout.num_thoughts, layout.num_thought_tokens
    layout.phase = "sample"
    layout.reach = reach
    start = positions[:, None].expand(B, N, P) if reach is None else positions[:, None] + reach
    step_positions = start.reshape(B, N * P)  # order (n, j)
    tokens = torch.full((B, N * P), model.thought_token_ids[0], dtype=torch.long, device=positions.device)
    thoughts = torch.empty(B, N, P, T, dtype=torch.long, device=positions.device)
    step_logits = []
    for m in range(T):
        layout.step = m
        hidden = model.body(
            inputs_embeds=model.embed(tokens),
            position_ids=step_positions + 1 + m,
            thought_layout=layout,
            use_cache=False,
        ).last_hidden_state
        logits = mask_thought_tokens(model.head_logits(hidden), model.thought_token_ids)
        tokens = draw(logits, temperature, greedy, generator) if forced is None else forced[..., m].reshape(B, N * P)
        thoughts[..., m] = tokens.view(B, N, P)
        if return_logits:
            step_logits.append(logits.view(B, N, P, -1))
        elif return_logprobs:
            step_logits.append(thought_logprobs(logits, tokens, temperature).view(B, N, P))
    if return_logits or return_logprobs:
        return thoughts, torch.stack(step_logits, dim=3)
    return thoughts


def branch_tokens(input_ids, thoughts, thought_token_ids, pad_token_id, num_lookahead, anchors=None):
    """The S tokens of every branch: ``[B, N, P, S]`` = <sot>, c_1..c_T, <eot>, x_{j+1}..x_{j+A-1}, for the P = L
    positions of the row, or the M of ``anchors [B, M]``.

    Lookahead tokens past the end of the row are ``pad_token_id`` (their predictions are never scored).
    """
    B, N, P, T = thoughts.shape
    L = input_ids.shape[1]
    columns = torch.arange(L, device=input_ids.device)[None] if anchors is None else anchor_columns(anchors)
    index = columns[..., None] + torch.arange(1, num_lookahead, device=input_ids.device)  # [1 or B, P, A - 1]
    flat = index.clamp(max=L - 1).reshape(index.shape[0], -1).expand(B, -1)
    lookahead = input_ids.gather(1, flat).view(B, P, num_lookahead - 1).masked_fill(index >= L, pad_token_id)
    start = thoughts.new_full((B, N, P, 1), thought_token_ids[0])
    end = thoughts.new_full((B, N, P, 1), thought_token_ids[1])
    return torch.cat([start, thoughts, end, lookahead[:, None].expand(B, N, P, -1)], dim=-1)


def expanded_pass(model, input_ids, key_padding, thoughts, anchors=None):
    """One model call over the thought-expanded rows (text, then N*P*S branch tokens), with gradient; P = L, or the
    M positions of ``anchors [B, M]`` (thoughts ``[B, N, P, T]``).

    Returns final hidden states of the text ``[B, L, D]`` and of every branch ``[B, N, P, S, D]``.
    """
    cfg = model.quietstar_config
    B, L = input_ids.shape
    N, S, P = cfg.num_thoughts, cfg.branch_length, thoughts.shape[2]
    branches = branch_tokens(input_ids, thoughts, model.thought_token_ids, model.pad_token_id, cfg.num_lookahead_tokens,
                             anchors)
    positions = model.text_positions(key_padding)
    thinking = positions if anchors is None else at_anchors(positions, anchors)  # [B, P]
    branch_positions = thinking[:, None, :, None] + torch.arange(1, S + 1, device=input_ids.device)
    ids = torch.cat([input_ids, branches.reshape(B, -1)], dim=1)
    all_positions = torch.cat([positions, branch_positions.expand(B, N, P, S).reshape(B, -1)], dim=1)
    layout = ThoughtLayout("expanded", key_padding, N, branch_length=S, attention=model.attention, anchors=anchors)
    hidden = model.body(
        inputs_embeds=model.embed(ids), position_ids=all_positions, thought_layout=layout, use_cache=False
    ).last_hidden_state
    return hidden[:, :L], hidden[:, L:].reshape(B, N, P, S, -1)
