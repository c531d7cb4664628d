"""Refuse models the quietstar attention would compute wrongly, with a message that says why."""

from __future__ import annotations

import torch

from .attention import ATTENTION_NAME, AttentionSettings, ThoughtLayout
from .head import LogitTransform, apply_output_head, decoder, output_head_names
from .thoughts import expanded_pass

def check_model_supported(base) -> None:
    """Raise ValueError unless every layer of ``base`` attends through the "quietstar" function exactly.

    Runs a 6-token probe: every decoder layer must call the function, and the family's head of ``body(x)``
    (quietstar.head: its output head module, then its logit scaling or soft-capping) must equal the model's own
    logits under its "eager" attention. (Sliding windows, attention-logit soft-capping and sinks arrive per call; a
    backend that lacks one refuses it there, by name.)
    """
    name = type(base).__name__
    if base.config._attn_implementation != ATTENTION_NAME:
        raise ValueError(f"{name} did not accept attn_implementation='{ATTENTION_NAME}': its attention does not route "
                         "through transformers' AttentionInterface, so Quiet-STaR cannot lay out thoughts in it.")
    layer_types = getattr(base.config.get_text_config(), "layer_types", None) or []
    if "indexed_attention" in layer_types:
        raise ValueError(f"{name} attends sparsely: in its 'indexed_attention' layers a learned indexer picks the keys "
                         "each query sees (DeepSeek sparse attention), a selection Quiet-STaR's thought layout cannot "
                         "make for branch tokens.")
    num_layers = getattr(base.config.get_text_config(), "num_hidden_layers", None)
    if num_layers is None:
        raise ValueError(f"{name}'s config has no num_hidden_layers: Quiet-STaR takes decoder-only causal LMs whose "
                         "config says how many attention layers they have.")
    embeddings = check_token_tables(base)
    ids = torch.arange(3, 9, device=embeddings.weight.device)[None] % embeddings.num_embeddings
    layout = ThoughtLayout("prefix", torch.ones_like(ids, dtype=torch.bool), 1, num_thought_tokens=1,
                           attention=AttentionSettings(attention_backend="eager"))
    was_training = base.training
    base.eval()  # dropout would make the two runs differ
    try:
        with torch.no_grad():
            hidden = decoder(base)(input_ids=ids, thought_layout=layout, use_cache=False).last_hidden_state
            logits = apply_output_head(base, output_head_names(base), hidden)
            ours = LogitTransform.from_config(base.config)(logits).float()
            base.set_attn_implementation("eager")
            reference = base(input_ids=ids, use_cache=False).logits.float()
    except ValueError:
        raise
    except Exception as error:  # the family's structure is not the decoder -> hidden -> head split we need
        raise ValueError(f"{name} failed Quiet-STaR's probe ({type(error).__name__}: {error}); its decoder "
                         "(quietstar.head.decoder) must return final hidden states that its output head turns into "
                         "logits.") from error
    finally:
        base.set_attn_implementation(ATTENTION_NAME)
        base.train(was_training)
    attended = len(layout.text_cache)
    if attended < num_layers:
        raise ValueError(f"Only {attended} of {name}'s {num_layers} layers attend through "
                         "transformers' AttentionInterface with the model call's keywords; Quiet-STaR needs all of "
                         "them to. The others mix tokens another way (linear attention, a state-space mixer) or do "
                         "not pass the call's keywords on to their attention (StableLM's and Nemotron's decoder "
                         "layers drop them), so the thought layout never reaches them.")
    if attended > num_layers:
        raise ValueError(f"{name} ran {attended} attention layers but its config declares num_hidden_layers="
                         f"{num_layers} (an encoder-decoder's decoder?); Quiet-STaR needs a decoder-only LM whose "
                         "layers all attend through transformers' AttentionInterface.")
    tolerance = 1e-3 if hidden.dtype == torch.float32 else 3e-2
    error = (ours - reference).abs().max() / reference.abs().max().clamp(min=1e-6)
    if not error <= tolerance:
        raise ValueError(f"{name}'s logits differ from its output head on the final hidden state under the quietstar "
                         f"attention (relative error {error:.2e}); the model does something Quiet-STaR's attention or "
                         "head split does not implement (a logit change other than quietstar.head's output head, "
                         "scaling and soft-capping, or an attention rule the attention function is not told of).")


def check_token_tables(base) -> torch.nn.Embedding:
    """The input embedding table, after refusing token tables Quiet-STaR cannot add its thought tokens to.

    Thought tokens take one new id each in one input table and one output head: a family with one table per audio
    codebook (MusicGen) has no single table, and one whose head predicts fewer ids than its input table holds
    (Mllama's extra image rows) would predict the thought ids from rows that do not exist.
    """
    name = type(base).__name__
    embeddings = base.get_input_embeddings()
    if not isinstance(embeddings, torch.nn.Embedding):
        raise ValueError(f"{name}'s input embeddings are a {type(embeddings).__name__}, not one token table (one "
                         "table per audio codebook, as MusicGen has?); Quiet-STaR adds its thought tokens to one "
                         "input table and one output head.")
    head = base.get_output_embeddings()
    predicted = getattr(head, "out_features", None) or getattr(getattr(head, "weight", None), "shape", [None])[0]
    if predicted is not None and predicted < embeddings.num_embeddings:
        raise ValueError(f"{name}'s output head predicts {predicted} ids but its input table holds "
                         f"{embeddings.num_embeddings} rows (input-only rows for image or audio tokens); the thought "
                         "tokens' new ids would land on those rows, which the head cannot predict or mask, so "
                         "Quiet-STaR refuses it.")
    return embeddings


def check_new_embeddings(base) -> None:
    """Refuse a family that cannot run from input vectors that are not rows of its embedding table.

    Thought tokens enter as new vectors through ``inputs_embeds``; a family that recovers token ids from its input
    vectors (Gemma 4 computes per-layer inputs that way) raises on them.
    """
    embeddings = base.get_input_embeddings()
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(1, 3, embeddings.embedding_dim, generator=generator).to(embeddings.weight)
    was_training, attention = base.training, base.config._attn_implementation
    base.eval()
    base.set_attn_implementation("eager")  # the family's own forward alone is on trial here
    try:
        with torch.no_grad():
            decoder(base)(inputs_embeds=vectors, use_cache=False)
    except Exception as error:  # noqa: BLE001 - any failure here means new vectors cannot be fed
        raise ValueError(f"{type(base).__name__} cannot run from input vectors that are not rows of its embedding "
                         f"table ({type(error).__name__}: {str(error).splitlines()[0][:160]}); Quiet-STaR feeds its "
                         "thought tokens as new vectors (inputs_embeds), so it cannot train thoughts in this family.")
    finally:
        base.set_attn_implementation(attention)
        base.train(was_training)


def check_thought_layout(model) -> None:
    """Raise ValueError unless one thought-expanded pass equals the family run on explicit sequences.

    ``check_model_supported`` probes plain text, where a layer that mixes tokens outside attention (a convolution
    over time, a token shift, a recurrent state) is computed right; in the expanded row it would mix neighbouring
    branches. So a row with a one-token thought at every position goes through ``expanded_pass``, and at two
    positions j every branch slot must give the logits the family itself gives on x_0..x_j <sot> c <eot> x_{j+1}.
    (A 4-token row: with its 4-token branches it spans 8 positions, inside the shortest sliding windows we meet.)
    """
    saved = model.quietstar_config
    base, name = model.base, type(model.base).__name__
    vocab = base.get_input_embeddings().num_embeddings
    ids = (torch.arange(3, 7, device=base.device)[None] * 7) % min(vocab, 250)
    thoughts = ((ids + 1) % min(vocab, 250)).view(1, 1, 4, 1)
    sot, eot = model.thought_token_ids
    was_training = base.training
    model.set_thought_lengths(num_thought_tokens=1, num_lookahead_tokens=2, num_thoughts=1)
    base.eval()
    try:
        with torch.no_grad():
            _, branch_hidden = expanded_pass(model, ids, torch.ones_like(ids, dtype=torch.bool), thoughts)
            ours = model.head_logits(branch_hidden[0, 0]).float()  # [L, S, V]
            base.set_attn_implementation("eager")
            errors = []
            for j in (1, 2):
                sequence = torch.cat([ids[0, : j + 1], ids.new_tensor([sot]), thoughts[0, 0, j], ids.new_tensor([eot]),
                                      ids[0, j + 1 : j + 2]])
                reference = base(inputs_embeds=model.embed(sequence[None]), use_cache=False).logits[0].float()
                expected = reference[j + 1 :]
                errors.append((ours[j, : len(expected)] - expected).abs().max() / expected.abs().max().clamp(min=1e-6))
    finally:
        base.set_attn_implementation(ATTENTION_NAME)
        base.train(was_training)
        model.set_thought_lengths(saved.num_thought_tokens, saved.num_lookahead_tokens, saved.num_thoughts)
    tolerance = 1e-3 if branch_hidden.dtype == torch.float32 else 3e-2
    error = max(errors)
    if not error <= tolerance:
        raise ValueError(f"{name} computes thought branches differently in one expanded pass than on explicit "
                         f"sequences (relative error {error:.2e}): some layer mixes tokens outside attention (a "
                         "convolution over time, a token shift, a recurrent state), or the family does not position "
                         "tokens by the position_ids it is given (BART-style decoders' learned positions take a "
                         "different shape), which Quiet-STaR's parallel thoughts cannot lay out.")
