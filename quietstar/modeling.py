"""QuietStarForCausalLM: a transformers causal LM, two thought tokens, a mixing head."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AddedToken

from . import attention  # noqa: F401  (registers the "quietstar" attention with transformers)
from . import checkpoint
from .anchors import anchor_columns
from .attention import ATTENTION_NAME, AttentionSettings
from .compat import check_model_supported, check_new_embeddings, check_thought_layout
from .config import QuietStarConfig
from .contrastive import moved_thought_nll
from .generation import GenerationOutput, generate
from .hindsight import sample_hindsight_thoughts
from .head import LogitTransform, apply_output_head, decoder, hidden_width, output_head_names
from .lora import THOUGHT_BRANCH_MASK, ThoughtTokenGate
from .loss_config import QuietStarLossConfig
from .losses import IGNORE_INDEX, check_anchored_loss, lookahead_targets, quietstar_loss
from .mixing import MixingHead, mix, thought_weight
from .ops.precision import at_least_fp32
from .ops.visibility import text_positions
from .padding import ensure_pad_token
from .positions import first_position_id
from .scoring import null_thoughts
from .thoughts import expanded_pass, sample_anchored_thoughts, sample_thoughts
from .vocab import mask_thought_tokens


@dataclass
class QuietStarOutput:
    """What a forward pass returns (docs/design.md §4). Logits of thought tokens are -inf in ``logits``.

    When the call thought at anchors only (``thought_fraction < 1``), ``anchors [B, M]`` holds the text position of
    each anchor slot (-1: unused) and the thought-side fields hold M slots in place of the L positions.
    """

    loss: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)
    base_logits: torch.Tensor | None = None  # [B, L, V]
    thought_logits: torch.Tensor | None = None  # [B, N, L, A, V], at b_{j,T+2+s}, before mixing
    mixing_weights: torch.Tensor | None = None  # [B, N, L, A], weight on the thought path
    logits: torch.Tensor | None = None  # [B, N, L, A, V], mixed
    thoughts: torch.Tensor | None = None  # [B, N, L, T]
    loss_terms: dict = field(default_factory=dict)  # weighted "nll", "thought_nll", "policy" (tensors); sum: loss
    anchors: torch.Tensor | None = None  # [B, M]; None: thoughts at every position


def _ahead(text: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
    """Per-position ``text [B, L, ...]`` at the lookahead columns j + s: ``shifted [L, A]`` (every position) gives
    ``[B, L, A, ...]``, ``shifted [B, M, A]`` (anchors) ``[B, M, A, ...]``."""
    if shifted.dim() == 2:
        return text[:, shifted]
    return text[torch.arange(text.shape[0], device=text.device)[:, None, None], shifted]


def _add_thought_tokens(tokenizer, config: QuietStarConfig) -> tuple[int, int]:
    """Add the two thought tokens as special tokens (reusing them if present); return their ids."""
    wanted = [config.start_thought_token, config.end_thought_token]
    missing = [t for t in wanted if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return tuple(tokenizer.convert_tokens_to_ids(t) for t in wanted)


def _resize_token_embeddings(base, size: int) -> None:
    """``base.resize_token_embeddings``, fixing what it does to BERT-style heads, which keep a bias beside the
    projection (``lm_head.bias``, in transformers' ties the source of ``lm_head.decoder.bias``): it resizes the
    projection's bias and leaves that one at the old size, or makes it the projection's even where the two were
    separate, which the checkpoint then saves once and loading does not tie. Each such bias ends tied exactly where it
    was before, at the new size (a separate one grown with zeros), so checkpoints load."""
    tied = getattr(base, "_tied_weights_keys", None)
    pairs = []  # (target, source, the source before resizing, whether the two were one parameter)
    for target, source in (tied.items() if isinstance(tied, dict) else ()):
        try:
            before = base.get_parameter(source)
            pairs.append((target, source, before, base.get_parameter(target) is before))
        except AttributeError:  # a tie this configuration does not have
            continue
    base.resize_token_embeddings(size, mean_resizing=False)
    for target, source, before, shared in pairs:
        resized, current = base.get_parameter(target), base.get_parameter(source)
        if shared:
            wanted = resized
        elif current is resized or current.shape != resized.shape:
            grown = resized.detach().new_zeros(resized.shape)
            grown[tuple(slice(0, n) for n in before.shape)] = before.detach()
            wanted = nn.Parameter(grown, requires_grad=before.requires_grad)
        else:
            continue
        if current is not wanted:
            owner, _, name = source.rpartition(".")
            setattr(base.get_submodule(owner), name, wanted)


class QuietStarForCausalLM(nn.Module):
    """Wraps a causal LM (``self.base``) so it thinks at every position (docs/design.md §1-2).

    Trainable parts: the LM itself, ``thought_embeddings`` (the input vectors of <|startofthought|>
    and <|endofthought|>, a separate parameter so they can get their own learning rate) and
    ``mixing_head``. ``config`` is the LM's config; ``quietstar_config`` what the model is (saved);
    ``loss_config`` how a call with ``labels`` weighs the loss (a run setting, not saved; default the recipe);
    ``attention`` how attention runs in this process (not saved; :meth:`set_attention`).
    """

    def __init__(self, base, tokenizer, quietstar_config: QuietStarConfig, thought_token_ids, pad_token_id: int,
                 base_model_id: str | None = None):
        super().__init__()
        self.base = base
        self.base_model_id = base_model_id  # the Hub id the LM came from, when it came from the Hub
        self.tokenizer = tokenizer
        self.quietstar_config = quietstar_config
        self.loss_config = QuietStarLossConfig()
        self.attention = AttentionSettings()
        self.thought_token_ids = tuple(int(i) for i in thought_token_ids)
        self.pad_token_id = int(pad_token_id)
        self.output_head_names = output_head_names(base)
        embedding_size = base.get_input_embeddings().embedding_dim
        weight = base.get_input_embeddings().weight
        self.thought_embeddings = nn.Parameter(weight.new_zeros(2, embedding_size, dtype=torch.float32))
        # The mixing head reads final hidden states, whose width can differ from the embeddings' (ELECTRA, OPT).
        self.mixing_head = MixingHead(hidden_width(base, self.output_head_names)).to(device=weight.device)
        self.logit_transform = LogitTransform.from_config(base.config)
        self.first_position_id = first_position_id(base)
        self._lora = None
        self._thought_gate = None

    # ------------------------------------------------------------------------------------------- LoRA
    def attach_lora(self, peft_model) -> None:
        """Record the peft wrapper whose adapters were injected into ``self.base`` (quietstar.lora.add_lora).
        It is kept outside the module tree, so parameters are not listed twice. With ``text_path="thought_lora"``
        the adapters are gated to act on thought-branch tokens only (quietstar.lora.ThoughtTokenGate)."""
        object.__setattr__(self, "_lora", peft_model)
        if self.quietstar_config.text_path == "thought_lora":
            object.__setattr__(self, "_thought_gate", ThoughtTokenGate(self.base, self.body.layers))

    @property
    def lora(self):
        """The peft wrapper of ``self.base`` when it trains through LoRA adapters, else None."""
        return self._lora

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the LM's weights (``merge_and_unload``); the model becomes a plain one."""
        if self._lora is None:
            raise ValueError("This model has no LoRA adapter to merge.")
        if self._thought_gate is not None:
            raise ValueError("This model's LoRA adapters act on thought tokens only (text_path='thought_lora'); merged "
                             "into the weights they would change every text prediction too. Keep the adapter "
                             "separate (save_pretrained writes it to adapter/).")
        self.base = self._lora.merge_and_unload()
        object.__setattr__(self, "_lora", None)

    # ----------------------------------------------------------------------------------------- build
    @classmethod
    def from_base(cls, base, tokenizer, config: QuietStarConfig | None = None, *,
                  loss_config: QuietStarLossConfig | None = None,
                  attention: AttentionSettings | None = None) -> "QuietStarForCausalLM":
        """Add the thought tokens to ``tokenizer`` and ``base`` and switch ``base`` to the quietstar attention.
        ``loss_config`` and ``attention`` set the model's run and process settings (default: the recipe, "auto")."""
        config = config or QuietStarConfig()
        ensure_pad_token(tokenizer)
        init_ids = tokenizer(config.thought_init_text, add_special_tokens=False).input_ids
        if not init_ids:
            raise ValueError(f"thought_init_text {config.thought_init_text!r} tokenizes to nothing.")
        base.set_attn_implementation(ATTENTION_NAME)
        check_model_supported(base)  # before the resize: a family that cannot take thoughts is refused untouched
        check_new_embeddings(base)
        thought_ids = _add_thought_tokens(tokenizer, config)
        if len(tokenizer) > base.get_input_embeddings().num_embeddings:
            _resize_token_embeddings(base, len(tokenizer))
        name = getattr(base, "name_or_path", "") or ""
        hub_id = name if name and not os.path.isdir(name) else None
        model = cls(base, tokenizer, config, thought_ids, tokenizer.pad_token_id, base_model_id=hub_id)
        model.loss_config = loss_config or QuietStarLossConfig()
        with torch.no_grad():
            init = base.get_input_embeddings().weight[init_ids[0]].float()
            model.thought_embeddings.copy_(init.expand(2, -1))
            model.write_thought_embeddings()
        check_thought_layout(model)  # under the default settings: the family's layout, whatever runs it later
        if attention is not None:
            model.set_attention(**attention.to_dict())
        return model

    # ------------------------------------------------------------------------------------ components
    @property
    def config(self):
        return self.base.config

    @property
    def body(self):
        """The decoder stack: ids/embeddings -> final (post-norm) hidden states."""
        return decoder(self.base)

    @property
    def lm_head(self):
        """The output embeddings (the projection to the vocabulary)."""
        return self.base.get_output_embeddings()

    @property
    def head_is_projection(self) -> bool:
        """True when the family's output head is ``lm_head`` alone (no transform before it)."""
        return len(self.output_head_names) == 1 and self.base.get_submodule(self.output_head_names[0]) is self.lm_head

    @property
    def head_is_affine(self) -> bool:
        """True when logits are an affine function of the final hidden state, so mixing hidden states equals mixing
        logits: a bare projection and no soft-capping."""
        return self.head_is_projection and self.logit_transform.is_affine

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[..., D]``, thought tokens mapped to ``thought_embeddings``."""
        module = self.base.get_input_embeddings()
        out = module(input_ids)
        vectors = self.thought_embeddings.to(out.dtype) * getattr(module, "embed_scale", 1.0)
        for slot, token_id in enumerate(self.thought_token_ids):
            out = torch.where((input_ids == token_id).unsqueeze(-1), vectors[slot], out)
        return out

    def text_positions(self, key_padding: torch.Tensor) -> torch.Tensor:
        """Position ids ``[B, L]`` of the text (``key_padding [B, L]`` bool): numbered as the family numbers them,
        skipping padding, so a left-padded row gets the positions of its unpadded self."""
        return text_positions(key_padding) + self.first_position_id

    @property
    def filler_token_id(self) -> int:
        """The first token of ``thought_init_text`` ("---"): what null thoughts are made of."""
        return self.tokenizer(self.quietstar_config.thought_init_text, add_special_tokens=False).input_ids[0]

    def branch_kwargs(self, branch_mask: torch.Tensor) -> dict:
        """Keywords for a model call without a thought layout that says which of its tokens are thought-branch tokens
        (``branch_mask [B, n]`` bool): what thought-only LoRA adapters act on. Empty for a model without them."""
        return {} if self._thought_gate is None else {THOUGHT_BRANCH_MASK: branch_mask}

    @property
    def _no_split_modules(self) -> list[str]:
        """The LM's decoder-layer classes: what FSDP's transformer auto-wrap shards as units."""
        return list(getattr(self.base, "_no_split_modules", None) or [])

    @torch.no_grad()
    def write_thought_embeddings(self) -> None:
        """Copy ``thought_embeddings`` into the LM's embedding matrix, so the LM alone uses them too."""
        weight = self.base.get_input_embeddings().weight
        weight[list(self.thought_token_ids)] = self.thought_embeddings.to(weight.dtype)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """Recompute each decoder layer in the backward (transformers' mechanism; Trainer calls this)."""
        self.base.activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs or {"use_reentrant": False}, **kwargs
        )

    def activation_checkpointing_disable(self):
        self.base.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.base.is_activation_checkpointing

    # ---------------------------------------------------------------------------------------- thinking
    def _key_padding(self, input_ids, attention_mask):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}.")
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}.")
        return attention_mask.bool()

    def sample_thoughts(self, input_ids, attention_mask=None, generator=None, greedy=False):
        """Thoughts at every position: ``[B, N, L, T]`` token ids (no gradient). ``greedy`` takes the argmax. A model
        whose thoughts are filler (``thoughts="filler"``, the null-thoughts control) samples nothing: every thought is
        the filler of quietstar.scoring.null_thoughts."""
        key_padding = self._key_padding(input_ids, attention_mask)
        if self.quietstar_config.thoughts == "filler":
            return null_thoughts(self, input_ids)
        return sample_thoughts(self, input_ids, key_padding, temperature=self.quietstar_config.thought_temperature,
                               greedy=greedy, generator=generator)

    def sample_anchored_thoughts(self, input_ids, attention_mask=None, labels=None, generator=None, greedy=False):
        """Thoughts at each row's ``thought_fraction`` of positions of highest base next-token entropy: ``anchors
        [B, M]`` and thoughts ``[B, N, M, T]`` (no gradient; quietstar.thoughts.sample_anchored_thoughts). A position
        may be an anchor when all A of its targets are scored: real tokens, and not IGNORE_INDEX in ``labels``."""
        key_padding = self._key_padding(input_ids, attention_mask)
        scored = input_ids if labels is None else labels
        eligible = lookahead_targets(scored.masked_fill(~key_padding, IGNORE_INDEX), key_padding,
                                     self.quietstar_config.num_lookahead_tokens)[1].all(dim=-1)
        return sample_anchored_thoughts(self, input_ids, key_padding, eligible,
                                        temperature=self.quietstar_config.thought_temperature, greedy=greedy,
                                        generator=generator)

    def set_thought_lengths(self, num_thought_tokens: int | None = None, num_lookahead_tokens: int | None = None,
                            num_thoughts: int | None = None) -> None:
        """Change T, A or N (None: keep) for the calls that follow: the one way evaluation and a thought curriculum
        change them. The weights do not depend on them."""
        changes = {name: value for name, value in (("num_thought_tokens", num_thought_tokens),
                                                   ("num_lookahead_tokens", num_lookahead_tokens),
                                                   ("num_thoughts", num_thoughts)) if value is not None}
        self.quietstar_config = dataclasses.replace(self.quietstar_config, **changes)

    def set_attention(self, **changes) -> None:
        """Change how attention runs (fields of :class:`quietstar.attention.AttentionSettings`: ``attention_backend``,
        ``sus_c``, ``sus_design``, ``triton_fp32_precision``) for the calls that follow. They are resolved for the
        device of the first call there (quietstar.attention.backends.resolve): a model is often built on a CPU and
        moved, so a backend this device cannot run is refused at that call, naming the field."""
        self.attention = dataclasses.replace(self.attention, **changes)

    def forward(self, input_ids, attention_mask=None, labels=None, thoughts=None, output_logits=True,
                generator=None, loss_config: QuietStarLossConfig | None = None, anchors=None) -> QuietStarOutput:
        """Think at every position (or, with ``thought_fraction < 1``, at anchors), mix, and (with ``labels``) compute
        the Quiet-STaR loss.

        input_ids/attention_mask/labels ``[B, L]`` (labels: IGNORE_INDEX where not scored; the target
        of position j is labels[j+1]). ``thoughts [B, N, L, T]`` replays given thoughts instead of
        sampling (at every position, whatever ``thought_fraction`` is); with ``anchors [B, M]`` (an output's
        ``anchors``) ``thoughts [B, N, M, T]`` replays thoughts at those anchors. Sampled thoughts are at anchors when
        ``thought_fraction < 1`` (and thoughts are not filler). ``output_logits=False`` skips ``thought_logits`` and
        keeps only what the loss needs. ``loss_config`` weighs the loss of this call (default: ``self.loss_config``;
        the trainer passes the run's, with its scheduled lambda); its ``reward_precision`` also sets the precision of
        the mixing path.
        """
        cfg = self.quietstar_config
        loss_config = self.loss_config if loss_config is None else loss_config
        if labels is not None:
            loss_config.check_mixing(cfg.mixing)
        T, A = cfg.num_thought_tokens, cfg.num_lookahead_tokens
        key_padding = self._key_padding(input_ids, attention_mask)
        shortest = int(key_padding.sum(dim=1).min())
        if shortest < A + 2:
            raise ValueError(f"A row has {shortest} real tokens; Quiet-STaR needs at least num_lookahead_tokens + 2 = "
                             f"{A + 2}. Drop or merge short documents, or lower num_lookahead_tokens.")
        if anchors is not None and thoughts is None:
            raise ValueError("anchors= replays thoughts at given anchors; pass their thoughts [B, N, M, T] too.")
        proposal_weights = None
        if thoughts is None and labels is not None and loss_config.hindsight_tokens > 0 and cfg.thoughts == "sampled":
            loss_config.check_hindsight(cfg.num_thoughts, cfg.thought_fraction)
            thoughts, proposal_weights = sample_hindsight_thoughts(
                self, input_ids, key_padding, loss_config.hindsight_tokens, loss_config.hindsight_thoughts,
                temperature=cfg.thought_temperature, generator=generator)
        elif thoughts is None and cfg.thought_fraction < 1 and cfg.thoughts == "sampled":
            anchors, thoughts = self.sample_anchored_thoughts(input_ids, attention_mask, labels, generator=generator)
        elif thoughts is None:
            thoughts = self.sample_thoughts(input_ids, attention_mask, generator=generator)
        L = input_ids.shape[1]
        expected = (input_ids.shape[0], cfg.num_thoughts, L if anchors is None else anchors.shape[1], T)
        if tuple(thoughts.shape) != expected:
            raise ValueError(f"thoughts must have shape [B, N, {'L' if anchors is None else 'M'}, T] = {expected}, "
                             f"got {tuple(thoughts.shape)}.")
        if labels is not None:  # before the contrastive pass, which would replay anchored thoughts
            check_anchored_loss(loss_config, anchors)

        moved_nll = None
        if labels is not None and loss_config.contrastive_reward_weight > 0:  # before the gradient pass: lower peak
            moved_nll = moved_thought_nll(self, input_ids, key_padding, labels, thoughts,
                                          loss_config.contrastive_distance(A), loss_config.reward_source)
        text_hidden, branch_hidden = expanded_pass(self, input_ids, key_padding, thoughts, anchors)
        base_logits = self.head_logits(text_hidden)
        sample_logits = mask_thought_tokens(self.head_logits(branch_hidden[..., :T, :]), self.thought_token_ids)
        thought_hidden = branch_hidden[..., T + 1 : T + 1 + A, :]  # [B, N, L or M, A, D]
        columns = torch.arange(L, device=input_ids.device) if anchors is None else anchor_columns(anchors)
        # h^base_{j+s}: [L, A] or [B, M, A]; out-of-row entries are never scored
        shifted = (columns[..., None] + torch.arange(A, device=input_ids.device)).clamp(max=L - 1)
        base_hidden = _ahead(text_hidden, shifted).unsqueeze(1).expand_as(thought_hidden)
        mixes_logits = cfg.mixing == "logprobs" or not self.head_is_affine
        needs_thought_logits = (output_logits or mixes_logits
                                or (labels is not None and loss_config.needs_thought_logits))
        fp32 = loss_config.reward_precision == "fp32"
        with self._reward_precision(input_ids.device, fp32):
            if fp32:
                base_hidden, thought_hidden = at_least_fp32(base_hidden), at_least_fp32(thought_hidden)
            thought_logits = self.head_logits(thought_hidden) if needs_thought_logits else None
            shifted_base_logits = None
            if mixes_logits:
                # Mixed from logits; base logits again only when autocast made them narrower than fp32.
                narrow = fp32 and base_logits.dtype not in (torch.float32, torch.float64)
                full = self.head_logits(at_least_fp32(text_hidden)) if narrow else base_logits
                shifted_base_logits = _ahead(full, shifted).unsqueeze(1)
            weights, mixed = self.mix_predictions(base_hidden, thought_hidden, shifted_base_logits, thought_logits)
        out = QuietStarOutput(base_logits=base_logits, thought_logits=thought_logits if output_logits else None,
                              mixing_weights=weights, logits=mixed, thoughts=thoughts, anchors=anchors)
        if labels is not None:
            masked_thought = (mask_thought_tokens(thought_logits, self.thought_token_ids)
                              if thought_logits is not None else None)
            out.loss, out.metrics, out.loss_terms = self.objective(base_logits, mixed, sample_logits, thoughts, weights,
                                                                   labels, key_padding, masked_thought, loss_config,
                                                                   moved_nll, anchors, proposal_weights)
            out.metrics["mixing_head_live_units"] = self.mixing_head.live_unit_fraction(base_hidden, thought_hidden)
        return out

    @staticmethod
    def _reward_precision(device: torch.device, fp32: bool):
        """fp32 for the reward path (reward_precision="fp32"): autocast off; else the caller's autocast."""
        if fp32:
            return torch.autocast(device_type=device.type, enabled=False)
        return contextlib.nullcontext()

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The family's logits of final hidden states ``hidden [..., D]`` -> ``[..., V]``: its output head, then its
        scaling or soft-capping (quietstar.head). A bare projection runs in fp32 when ``hidden`` is fp32 and its
        weights are not (pure bf16 weights); a head with a transform before it (BERT-style) runs in its weights'
        dtype. The rows are flattened first: a strided N-D input would make the matmul broadcast the head's
        weight into a batched product (seconds instead of milliseconds at a 49k vocabulary)."""
        head = self.lm_head
        flat = hidden.reshape(-1, hidden.shape[-1])
        if not self.head_is_projection:
            logits = apply_output_head(self.base, self.output_head_names, flat.to(head.weight.dtype))
        elif hidden.dtype == torch.float32 and head.weight.dtype != torch.float32:
            bias = None if getattr(head, "bias", None) is None else head.bias.float()
            logits = torch.nn.functional.linear(flat, head.weight.float(), bias)
        else:
            logits = head(flat)
        return self.logit_transform(logits).view(*hidden.shape[:-1], logits.shape[-1])

    def mix_predictions(self, base_hidden, thought_hidden, shifted_base_logits=None, thought_logits=None):
        """Thought weights ``[B, N, L, A]`` and mixed, thought-token-masked logits ``[B, N, L, A, V]``.

        base_hidden/thought_hidden ``[B, N, L, A, D]`` (h^base_{j+s}, h^thought_{j,s});
        shifted_base_logits broadcastable to ``[B, N, L, A, V]`` (used when mixing logits rather than hidden states:
        'logprobs' mixing, or a soft-capped head; computed from base_hidden when not given).
        """
        mode = self.quietstar_config.mixing
        weights = thought_weight(self.mixing_head(base_hidden, thought_hidden), mode)
        if mode in ("logits", "bounded") and self.head_is_affine:
            # The head is affine, so mixing hidden states equals mixing logits at a fraction of the cost.
            w = weights.unsqueeze(-1).to(thought_hidden.dtype)
            mixed = self.head_logits((1 - w) * base_hidden + w * thought_hidden)
        else:
            if thought_logits is None:
                thought_logits = self.head_logits(thought_hidden)
            if shifted_base_logits is None:
                shifted_base_logits = self.head_logits(base_hidden)
            mixed = mix(shifted_base_logits, thought_logits, weights, mode)
        return weights, mask_thought_tokens(mixed, self.thought_token_ids)

    def objective(self, base_logits, mixed, sample_logits, thoughts, weights, labels, key_padding, thought_logits=None,
                  loss_config: QuietStarLossConfig | None = None, moved_nll=None, anchors=None, proposal_weights=None):
        """The Quiet-STaR loss, metrics and weighted loss terms (quietstar.losses.quietstar_loss), weighed by
        ``loss_config`` (default: ``self.loss_config``); ``moved_nll`` from quietstar.contrastive.moved_thought_nll
        when the reward is position-contrastive; ``anchors [B, M]`` when the thoughts are at anchors;
        ``proposal_weights [B, N, L]`` the importance weights of hindsight proposals (quietstar.hindsight)."""
        return quietstar_loss(
            mask_thought_tokens(base_logits, self.thought_token_ids), mixed, sample_logits, thoughts, weights,
            labels.masked_fill(~key_padding, IGNORE_INDEX), key_padding,
            self.loss_config if loss_config is None else loss_config,
            thought_logits=thought_logits, sample_temperature=self.quietstar_config.thought_temperature,
            moved_nll=moved_nll, anchors=anchors, proposal_weights=proposal_weights,
        )

    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, do_sample=False, temperature=1.0,
                 greedy_thoughts=False, thoughts=None, generator=None, eos_token_id=None) -> GenerationOutput:
        """Generate text, thinking before every token, until every row ends: :func:`quietstar.generation.generate`."""
        if thoughts is None and self.quietstar_config.thoughts == "filler":
            thoughts = input_ids.new_full((input_ids.shape[0], max_new_tokens, self.quietstar_config.num_thought_tokens),
                                          self.filler_token_id)
        return generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, greedy_thoughts=greedy_thoughts, thoughts=thoughts,
                        generator=generator, eos_token_id=eos_token_id)

    # ------------------------------------------------------------------------------------- save/load
    def save_pretrained(self, path: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Write a folder that ``AutoModelForCausalLM`` loads as a plain LM, plus the Quiet-STaR parts
        (quietstar/checkpoint.py). A save that fails leaves ``path`` as it was.

        ``state_dict``: this module's full state dict, when the parameters themselves are sharded (FSDP: the
        trainer gathers it with ``accelerator.get_state_dict``); by default the parameters are read directly.
        """
        checkpoint.save(self, path, state_dict)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype=torch.float32, *, attention: AttentionSettings | None = None,
                        **kwargs) -> "QuietStarForCausalLM":
        """Load what :meth:`save_pretrained` wrote, from a folder or a Hub id; ``attention``: how attention runs
        (default: "auto", whatever the run that saved it used); ``kwargs`` go to
        ``AutoModelForCausalLM.from_pretrained``."""
        model = checkpoint.load(cls, path, dtype, **kwargs)
        if attention is not None:
            model.set_attention(**attention.to_dict())
        return model
