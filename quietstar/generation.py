"""Thought-aware generation: every new token is predicted from the mixed logits after a thought.

At each step, with context x_0..x_t: think <sot> c_1..c_T <eot> at position t, take the thought hidden
state h^thought_{t,0} at <eot> and the base hidden state h^base_t, mix (docs/design.md §1, s = 0) and pick
x_{t+1}. The context's K/V cache is kept across steps; the thought is decoded on top of it into
scratch slots that are cropped away afterwards, so a step costs T + 1 forwards
of one or two tokens (the new token and the next thought's <sot> share one).
:func:`generate_reference` is the slow definition (recompute everything from scratch each step)
that the fast path is tested and benchmarked against.

Generation stops, as transformers' ``generate`` does, at the step where every row has produced an end-of-sequence
id (:func:`eos_token_ids`); a row that ended earlier is padded with the model's ``pad_token_id`` after its EOS, in
its tokens and in its thoughts. ``GenerationOutput.lengths`` and ``GenerationOutput.row`` give each row's part up
to and including its EOS, which is all a rendering should show.

Shapes: B batch, P prompt length, M new tokens (at most ``max_new_tokens``), T thought tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .mixing import mix, thought_weight
from .thoughts import draw
from .vocab import mask_thought_tokens


@dataclass
class GenerationOutput:
    """Past ``lengths[b]`` a row is padding: its tokens and thoughts are pad_token_id, and its logits and mixing
    weights, computed from the padding, mean nothing."""

    sequences: torch.Tensor  # [B, P + M]: the prompt, then the new tokens
    thoughts: torch.Tensor  # [B, M, T]: the thought behind each new token
    logits: torch.Tensor  # [B, M, V]: the mixed logits each new token was picked from
    mixing_weights: torch.Tensor  # [B, M]: weight on the thought path
    lengths: torch.Tensor  # [B]: new tokens of each row up to and including its EOS (M for a row that did not end)

    def row(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row ``b``'s new tokens ``[n]``, their thoughts ``[n, T]`` and mixing weights ``[n]``, n = lengths[b]:
        nothing past its EOS."""
        n, new = int(self.lengths[b]), self.thoughts.shape[1]
        return self.sequences[b, self.sequences.shape[1] - new:][:n], self.thoughts[b, :n], self.mixing_weights[b, :n]


def eos_token_ids(model, eos_token_id=None) -> list[int]:
    """The ids that end a row: ``eos_token_id`` (an id or a list of ids, as transformers' ``generate`` takes them;
    [] never stops), by default the tokenizer's eos token, else the LM's generation config's; [] when none is known."""
    if eos_token_id is None:
        eos_token_id = getattr(model.tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        generation_config = getattr(model.base, "generation_config", None)
        eos_token_id = getattr(generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]


def _mixed_logits(model, base_hidden, thought_hidden):
    """Mixed next-token logits ``[B, V]`` and the thought weight ``[B]`` from two hidden states ``[B, D]``."""
    mode = model.quietstar_config.mixing
    weight = thought_weight(model.mixing_head(base_hidden, thought_hidden), mode)
    logits = mix(model.head_logits(base_hidden), model.head_logits(thought_hidden), weight, mode)
    return mask_thought_tokens(logits, model.thought_token_ids), weight


def _pick(logits, do_sample, temperature, generator):
    return draw(logits, temperature, greedy=not do_sample, generator=generator)


class _BufferedLayer(DynamicLayer):
    """A full-attention cache layer over a buffer with room to spare: appending writes in place and cropping
    moves the end. transformers' DynamicLayer concatenates, copying the whole cache for every token fed,
    which at long contexts costs more than the single-token forward itself. ``keys``/``values`` stay
    views ``[B, H, length, d]`` of the buffer, so everything that reads a DynamicLayer reads this one."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._length = 0
        self._key_buffer = self._buffer_like(key_states, self.capacity)
        self._value_buffer = self._buffer_like(value_states, self.capacity)

    @staticmethod
    def _buffer_like(states: torch.Tensor, length: int) -> torch.Tensor:
        return states.new_empty(*states.shape[:-2], length, states.shape[-1])

    def _view(self) -> None:
        self.keys = self._key_buffer[..., : self._length, :]
        self.values = self._value_buffer[..., : self._length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._length + key_states.shape[-2]
        if end > self._key_buffer.shape[-2]:  # more than announced: grow geometrically, like a list
            size = max(end, 2 * self._key_buffer.shape[-2])
            for name in ("_key_buffer", "_value_buffer"):
                old = getattr(self, name)
                grown = self._buffer_like(old, size)
                grown[..., : self._length, :] = old[..., : self._length, :]
                setattr(self, name, grown)
        self._key_buffer[..., self._length : end, :] = key_states
        self._value_buffer[..., self._length : end, :] = value_states
        self._length = end
        self._view()
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count (tokens to remove), as DynamicLayer.crop does.")
        if self.is_initialized:
            self._length = max(self._length + tokens_to_remove, 0)
            self._view()


def _buffered_cache(config, capacity: int) -> DynamicCache:
    """transformers' DynamicCache for this model, its attention layers buffered (linear-attention and other special
    layers stay as transformers builds them). Sliding-window layers keep every token too: the quietstar attention
    applies the window itself, on position ids that skip padding, and cropping a thought must restore the context
    a window-sized cache would already have dropped."""
    cache = DynamicCache(config=config)
    cache.layers = [_BufferedLayer(capacity) if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) else layer
                    for layer in cache.layers]
    return cache


class _CachedLM:
    """The base LM over a growing K/V cache, fed embeddings (thought tokens mapped to their trained vectors)."""

    def __init__(self, model, prompt_mask: torch.Tensor, capacity: int):
        self.model = model
        self.cache = _buffered_cache(model.config, capacity)
        # Without padding no mask is passed at all (causal attention needs none), which saves its upkeep per token.
        self.attention_mask = None if bool(prompt_mask.all()) else prompt_mask.new_zeros(prompt_mask.shape[0], 0)

    def feed(self, tokens: torch.Tensor, positions: torch.Tensor, branch: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``tokens [B, k]`` (padding where ``mask`` is 0) at ``positions [B, k]``; ``branch [k]`` bool says
        which are thought tokens (the text tokens are computed without thought-only adapters). Return their final
        hidden states ``[B, k, D]``."""
        if self.attention_mask is not None:
            mask = torch.ones_like(tokens) if mask is None else mask.long()
            self.attention_mask = torch.cat([self.attention_mask, mask], dim=1)
        return self.model.body(
            inputs_embeds=self.model.embed(tokens), attention_mask=self.attention_mask, position_ids=positions,
            past_key_values=self.cache, use_cache=True,
            **self.model.branch_kwargs(branch.to(tokens.device).expand(tokens.shape)),
        ).last_hidden_state

    def crop(self, num_tokens: int) -> None:
        """Forget the last ``num_tokens`` tokens (a thought's scratch slots)."""
        self.cache.crop(-num_tokens)
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[:, :-num_tokens]


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, max_new_tokens=32, do_sample=False, temperature=1.0,
             greedy_thoughts=False, thoughts=None, generator=None, eos_token_id=None) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens, thinking before each (fast path: cached prefix, scratch thoughts).

    ``do_sample``/``temperature`` choose the text tokens (greedy by default); thoughts are sampled at
    the config's ``thought_temperature`` (or greedily). ``thoughts [B, M, T]`` replays given thoughts.
    Generation stops once every row has produced one of :func:`eos_token_ids` (``eos_token_id``: an id or a list;
    by default the tokenizer's); rows that ended earlier are padded after their EOS. Prompts may be left-padded.
    """
    cfg = model.quietstar_config
    B, T = input_ids.shape[0], cfg.num_thought_tokens
    sot, eot = model.thought_token_ids
    device = input_ids.device
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    lm = _CachedLM(model, attention_mask, capacity=input_ids.shape[1] + max_new_tokens + T + 2)
    sot_column = torch.full((B, 1), sot, dtype=torch.long, device=device)
    # The first thought's <sot> rides along with the prompt, and each later one with the token before
    # it: one forward instead of two per new token. The <sot> slot is scratch like the rest of the thought.
    prompt_positions = model.text_positions(attention_mask.bool())
    last_position = prompt_positions[:, -1]  # [B]
    text_then_sot = torch.arange(input_ids.shape[1] + 1, device=device) == input_ids.shape[1]
    hidden = lm.feed(torch.cat([input_ids, sot_column], dim=1),
                     torch.cat([prompt_positions, (last_position + 1)[:, None]], dim=1), text_then_sot,
                     torch.cat([attention_mask, torch.ones_like(sot_column)], dim=1))
    thought_only = torch.ones(1, dtype=torch.bool, device=device)
    base_hidden, sot_hidden = hidden[:, -2], hidden[:, -1]
    new_tokens, all_thoughts, all_logits, all_weights = [], [], [], []
    eos = torch.tensor(eos_token_ids(model, eos_token_id), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        start = last_position + 2  # c_1 sits right after <sot>, which sits right after the last context token
        if thoughts is None:
            thought = torch.empty(B, T, dtype=torch.long, device=device)
            hidden = sot_hidden
            for m in range(T):
                if m > 0:
                    hidden = lm.feed(thought[:, m - 1 : m], (start + m - 1)[:, None], thought_only)[:, -1]
                logits = mask_thought_tokens(model.head_logits(hidden), model.thought_token_ids)
                thought[:, m] = draw(logits, cfg.thought_temperature, greedy_thoughts, generator)
            tail = torch.cat([thought[:, -1:], torch.full_like(sot_column, eot)], dim=1)  # c_T and <eot>: no sampling
            tail_positions = (start + T - 1)[:, None] + torch.arange(2, device=device)
        else:
            thought = thoughts[:, step]
            tail = torch.cat([thought, torch.full_like(sot_column, eot)], dim=1)
            tail_positions = start[:, None] + torch.arange(T + 1, device=device)
        thought_hidden = lm.feed(tail, tail_positions, thought_only)[:, -1]
        lm.crop(T + 2)  # <sot> c_1..c_T <eot>
        logits, weight = _mixed_logits(model, base_hidden, thought_hidden)
        token = _pick(logits, do_sample, temperature, generator)
        # A row that has ended is padding from here on, in its text and in its thoughts.
        token = torch.where(finished, model.pad_token_id, token)
        thought = torch.where(finished[:, None], model.pad_token_id, thought)
        lengths += ~finished
        finished |= torch.isin(token, eos)
        last_position = last_position + 1
        new_tokens.append(token)
        all_thoughts.append(thought)
        all_logits.append(logits)
        all_weights.append(weight)
        if bool(finished.all()):
            break
        if step + 1 < max_new_tokens:
            hidden = lm.feed(torch.cat([token[:, None], sot_column], dim=1),
                             last_position[:, None] + torch.arange(2, device=device), text_then_sot[-2:])
            base_hidden, sot_hidden = hidden[:, 0], hidden[:, 1]
    return GenerationOutput(
        sequences=torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1),
        thoughts=torch.stack(all_thoughts, dim=1),
        logits=torch.stack(all_logits, dim=1),
        mixing_weights=torch.stack(all_weights, dim=1),
        lengths=lengths,
    )


@torch.no_grad()
def generate_reference(model, input_ids, thoughts=None, max_new_tokens=None, do_sample=False, temperature=1.0,
                       greedy_thoughts=False, generator=None, eos_token_id=None):
    """The slow definition, for one unpadded row ``[1, P]``: recompute everything from scratch, no cache.

    Each thought token is drawn from a fresh run over context + <sot> + the thought so far, and each
    new token from fresh runs over the context and over context + <sot> c <eot>. ``thoughts [1, M, T]``
    replays given thoughts (then ``max_new_tokens`` defaults to M). It stops after the first token in
    :func:`eos_token_ids`. Returns sequences ``[1, P + M]``, thoughts ``[1, M, T]`` and the mixed logits ``[1, M, V]``.
    """
    cfg = model.quietstar_config
    sot, eot = model.thought_token_ids
    steps = thoughts.shape[1] if max_new_tokens is None else max_new_tokens
    eos = eos_token_ids(model, eos_token_id)

    def last_hidden(sequence, text_length):
        branch = (torch.arange(len(sequence), device=sequence.device) >= text_length)[None]
        return model.body(inputs_embeds=model.embed(sequence[None]),
                          **model.branch_kwargs(branch)).last_hidden_state[:, -1]

    sequence = input_ids[0]
    used_thoughts, logits_per_step = [], []
    for step in range(steps):
        branch = torch.cat([sequence, sequence.new_tensor([sot])])
        if thoughts is None:
            for _ in range(cfg.num_thought_tokens):
                hidden = last_hidden(branch, len(sequence))
                logits = mask_thought_tokens(model.head_logits(hidden), model.thought_token_ids)
                branch = torch.cat([branch, draw(logits, cfg.thought_temperature, greedy_thoughts, generator)])
        else:
            branch = torch.cat([branch, thoughts[0, step]])
        used_thoughts.append(branch[len(sequence) + 1 :])
        thought_hidden = last_hidden(torch.cat([branch, branch.new_tensor([eot])]), len(sequence))
        logits, _ = _mixed_logits(model, last_hidden(sequence, len(sequence)), thought_hidden)
        sequence = torch.cat([sequence, _pick(logits, do_sample, temperature, generator)])
        logits_per_step.append(logits)
        if int(sequence[-1]) in eos:
            break
    return sequence[None], torch.stack(used_thoughts)[None], torch.stack(logits_per_step, dim=1)
