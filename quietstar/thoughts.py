"""The three phases of a Quiet-STaR step (docs/design.md §2): text pass, no-grad thought sampling, expanded gradient pass.

Shapes: B batch, L text tokens, N thought samples, T thought tokens, A lookahead tokens,
S = T + A + 1 branch tokens, D hidden size, V vocabulary.

Branch of position j (0-based slots): 0 = <|startofthought|>, 1..T = c_{j,1..T},
T+1 = <|endofthought|>, T+2..T+A = x_{j+1}..x_{j+A-1}; slot k has position id pos_j + k + 1.
Slot m-1 predicts c_{j,m} (m = 1..T); slot T+1+s gives h^thought_{j,s}, which predicts x_{j+1+s}.
"""

from __future__ import annotations

import torch

from .attention import ThoughtLayout
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
    cfg = model.quietstar_config
    B, L = input_ids.shape
    N, T = cfg.num_thoughts, cfg.num_thought_tokens
    positions = model.text_positions(key_padding)
    layout = ThoughtLayout("prefix", key_padding, N, num_thought_tokens=T, attention=model.attention)
    model.body(inputs_embeds=model.embed(input_ids), position_ids=positions, thought_layout=layout, use_cache=False)

    layout.phase = "sample"
    step_positions = positions.repeat(1, N)  # [B, N*L], order (n, j)
    tokens = torch.full((B, N * L), model.thought_token_ids[0], dtype=torch.long, device=input_ids.device)
    thoughts = torch.empty(B, N, L, T, dtype=torch.long, device=input_ids.device)
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
        tokens = draw(logits, temperature, greedy, generator)
        thoughts[..., m] = tokens.view(B, N, L)
        if return_logits:
            step_logits.append(logits.view(B, N, L, -1))
    return (thoughts, torch.stack(step_logits, dim=3)) if return_logits else thoughts


def branch_tokens(input_ids, thoughts, thought_token_ids, pad_token_id, num_lookahead):
    """The S tokens of every branch: ``[B, N, L, S]`` = <sot>, c_1..c_T, <eot>, x_{j+1}..x_{j+A-1}.

    Lookahead tokens past the end of the row are ``pad_token_id`` (their predictions are never scored).
    """
    B, N, L, T = thoughts.shape
    index = torch.arange(L, device=input_ids.device)[:, None] + torch.arange(1, num_lookahead, device=input_ids.device)
    lookahead = input_ids.gather(1, index.clamp(max=L - 1).view(1, -1).expand(B, -1)).view(B, L, num_lookahead - 1)
    lookahead = lookahead.masked_fill(index >= L, pad_token_id)
    start = thoughts.new_full((B, N, L, 1), thought_token_ids[0])
    end = thoughts.new_full((B, N, L, 1), thought_token_ids[1])
    return torch.cat([start, thoughts, end, lookahead[:, None].expand(B, N, L, -1)], dim=-1)


def expanded_pass(model, input_ids, key_padding, thoughts):
    """One model call over the thought-expanded rows (text, then N*L*S branch tokens), with gradient.

    Returns final hidden states of the text ``[B, L, D]`` and of every branch ``[B, N, L, S, D]``.
    """
    cfg = model.quietstar_config
    B, L = input_ids.shape
    N, S = cfg.num_thoughts, cfg.branch_length
    branches = branch_tokens(input_ids, thoughts, model.thought_token_ids, model.pad_token_id, cfg.num_lookahead_tokens)
    positions = model.text_positions(key_padding)
    branch_positions = positions[:, None, :, None] + torch.arange(1, S + 1, device=input_ids.device)
    ids = torch.cat([input_ids, branches.reshape(B, -1)], dim=1)
    all_positions = torch.cat([positions, branch_positions.expand(B, N, L, S).reshape(B, -1)], dim=1)
    layout = ThoughtLayout("expanded", key_padding, N, branch_length=S, attention=model.attention)
    hidden = model.body(
        inputs_embeds=model.embed(ids), position_ids=all_positions, thought_layout=layout, use_cache=False
    ).last_hidden_state
    return hidden[:, :L], hidden[:, L:].reshape(B, N, L, S, -1)
