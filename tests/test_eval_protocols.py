"""The evaluation protocols (quietstar/evaluation): valid answer tokens, the paper score, the scorers, GSM8K chain of
thought and CommonsenseQA accuracy, each against a hand computation or the official lists."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from conftest import CSQA_ROWS, GSM8K_ROWS, make_model, randomize_mixing_head
from quietstar.evaluation import answer_tokens, generators, prompts, protocols
from quietstar.evaluation import data as eval_data
from quietstar.padding import right_pad
from quietstar.scoring import BaseScorer, ThoughtScorer, configure_for_scoring
from quietstar.tiny import byte_tokenizer


def ids_of(tokenizer, *tokens):
    return sorted(tokenizer.convert_tokens_to_ids(t) for t in tokens)


# ------------------------------------------------------------------------------- test tokenizers
def sentencepiece_like_tokenizer():
    """A Llama/Mistral-style tokenizer: "▁" marks spaces, digits are single tokens, no "▁4" pieces, letters
    merge with "▁" ("▁A"), and characters outside the vocabulary (the newline) fall back to bytes."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    merges = [("▁", c) for c in "ABCDEQ"]
    for piece in ["▁", *"0123456789", *"ABCDEQ", *"abcdefghijklmnopqrstuvwxyz", ":", "?", "(", ")", "+", ","]:
        vocab.setdefault(piece, len(vocab))
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def gpt2_like_tokenizer():
    """A byte-level BPE with leading-space tokens ("ĠA") that merges digits (" 42" is one token "Ġ42")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("4", "2"), ("Ġ", "42"), ("Ġ", "4")] + [("Ġ", c) for c in "ABCDE"]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="Ċ")


# ------------------------------------------------------------------------------ valid answer tokens
def test_valid_tokens_of_the_byte_tokenizer_are_the_digits_or_letters_and_newline():
    tok = byte_tokenizer()
    assert answer_tokens.valid_answer_tokens(tok, "gsm8k") == sorted(tok.convert_tokens_to_ids(list("0123456789") + ["Ċ"]))
    assert answer_tokens.valid_answer_tokens(tok, "commonsense_qa") == ids_of(tok, "A", "B", "C", "D", "E", "Ċ")


def test_valid_tokens_of_a_sentencepiece_like_tokenizer_skip_the_space_piece_and_byte_duplicates():
    tok = sentencepiece_like_tokenizer()
    pieces = tok.convert_ids_to_tokens(tok(" 42\n", add_special_tokens=False).input_ids)
    assert pieces == ["▁", "▁", "4", "2", "<0x0A>"]
    assert answer_tokens.valid_answer_tokens(tok, "gsm8k") == ids_of(tok, *"0123456789", "<0x0A>")  # not "▁", not <0x34>
    letters = ids_of(tok, "▁A", "▁B", "▁C", "▁D", "▁E", "<0x0A>")
    assert answer_tokens.valid_answer_tokens(tok, "commonsense_qa") == letters


def test_valid_tokens_of_a_bpe_with_leading_space_and_merged_digit_tokens():
    tok = gpt2_like_tokenizer()
    valid = set(answer_tokens.valid_answer_tokens(tok, "gsm8k"))
    assert set(ids_of(tok, "Ġ42", "Ġ4", "42", "7", "0", "Ċ")) <= valid
    assert not set(ids_of(tok, "Ġ", "ĠA", "A", ",")) & valid
    assert answer_tokens.valid_answer_tokens(tok, "commonsense_qa") == ids_of(tok, "ĠA", "ĠB", "ĠC", "ĠD", "ĠE", "Ċ")
    ids, start = answer_tokens.answer_token_span(tok, "Q: x?\nA:", " 42\n")
    assert tok.convert_ids_to_tokens(ids[start:]) == ["Ġ42", "Ċ"]


def test_valid_tokens_match_the_official_lists_on_the_mistral_7b_tokenizer(tmp_path):
    """The official eval_helpers.py hard-codes Mistral-7B-v0.1's ids; mistral-common ships that tokenizer."""
    path = eval_data.packaged_file("mistral_common", ("data", "tokenizer.model.v1"))
    if path is None or importlib.util.find_spec("sentencepiece") is None:
        pytest.skip("needs the Mistral tokenizer: pip install --no-deps mistral-common sentencepiece protobuf")
    from transformers import LlamaTokenizer

    (tmp_path / "tokenizer.model").write_bytes(open(path, "rb").read())
    tok = LlamaTokenizer.from_pretrained(tmp_path)
    assert answer_tokens.valid_answer_tokens(tok, "gsm8k") == sorted(
        [28740, 28750, 28770, 28781, 28782, 28784, 28787, 28783, 28774, 28734, 13])
    assert answer_tokens.valid_answer_tokens(tok, "commonsense_qa") == sorted([330, 365, 334, 384, 413, 13])


# ------------------------------------------------------------------------------------- paper score
def test_paper_prompts_follow_the_official_format():
    assert prompts.paper_prompt_and_answer("gsm8k", GSM8K_ROWS[1]) == (
        "Q: Tom has 3 apples and buys 39 more. How many?\nA:", " 42\n")
    prompt, answer = prompts.paper_prompt_and_answer("commonsense_qa", CSQA_ROWS[0])
    assert prompt == "Q: Where do fish live?\n(A) sea\n(B) tree\n(C) sky\n(D) desk\n(E) moon\nA:" and answer == " A\n"


class UniformScorer:
    """Equal probability for every token: each valid answer token gets 1 / |valid set|."""

    def __init__(self, vocab_size, boost=None):
        self.vocab_size, self.boost = vocab_size, boost

    def __call__(self, ids, mask, shared_prefix=0):
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab_size)
        if self.boost is not None:
            logits[..., self.boost[0]] = math.log(self.boost[1])  # that token is boost[1] times as likely
        return logits.log_softmax(-1)


def test_paper_score_equals_a_hand_computation():
    tok = byte_tokenizer()
    score, records = protocols.run_paper("gsm8k", GSM8K_ROWS, UniformScorer(len(tok)), tok, 2, "cpu")
    # " 4\n": the space is skipped, "4" and "\n" each have probability 1/11 among the 11 valid tokens.
    assert records[0]["score"] == pytest.approx((1 / 11) ** 2) and records[0]["skipped_tokens"] == [" "]
    assert records[1]["score"] == pytest.approx((1 / 11) ** 3) and records[1]["scored_tokens"] == ["4", "2", "\n"]
    assert score == pytest.approx(((1 / 11) ** 2 + (1 / 11) ** 3) / 2)
    four = tok.convert_tokens_to_ids("4")  # "4" three times as likely as each other valid token: 3/13 and 1/13
    _, records = protocols.run_paper("gsm8k", GSM8K_ROWS, UniformScorer(len(tok), (four, 3.0)), tok, 2, "cpu")
    assert records[0]["score"] == pytest.approx(3 / 13 * 1 / 13)
    assert records[1]["score"] == pytest.approx(3 / 13 * 1 / 13 * 1 / 13)
    _, records = protocols.run_paper("commonsense_qa", CSQA_ROWS, UniformScorer(len(tok)), tok, 2, "cpu")
    assert [r["score"] for r in records] == pytest.approx([(1 / 6) ** 2] * 2)


def test_paper_score_is_the_renormalised_product_for_random_log_probs():
    tok = gpt2_like_tokenizer()
    ids, start = answer_tokens.answer_token_span(tok, "Q: x?\nA:", " 42\n")
    valid = answer_tokens.valid_answer_tokens(tok, "gsm8k")
    log_probs = torch.randn(len(ids), len(tok)).log_softmax(-1)
    probs = log_probs.exp()
    expected = 1.0
    for t in range(start, len(ids)):
        expected *= float(probs[t - 1, ids[t]] / probs[t - 1, valid].sum())
    result = protocols.paper_item_score(log_probs, ids, start, torch.tensor(valid), tok)
    assert result["score"] == pytest.approx(expected, rel=1e-5) and len(result["scored_tokens"]) == 2


# ---------------------------------------------------------------------------------------- scorers
def short_batch(tok, texts=("Q: 1 + 1?\nA: 2\n", "Q: hi\nA:")):
    enc = [tok(t).input_ids for t in texts]
    return right_pad(enc, tok.pad_token_id)


def test_thought_scorer_averages_probabilities_over_thoughts_and_needs_one_lookahead_slot():
    model = make_model("llama", num_thought_tokens=2, num_lookahead_tokens=3, num_thoughts=3)
    randomize_mixing_head(model, scale=2.0)
    ids, mask = short_batch(model.tokenizer)
    thoughts = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(thoughts[:, 0], thoughts[:, 1])  # the N samples differ, so averaging matters
    with torch.no_grad():
        mixed = model(ids, attention_mask=mask, thoughts=thoughts).logits[:, :, :, 0]  # A = 3
    expected = mixed.softmax(-1).mean(dim=1).log()
    configure_for_scoring(model, num_thoughts=3)
    assert model.quietstar_config.num_lookahead_tokens == 1
    with pytest.raises(ValueError, match="ensemble"):  # averaging N thoughts must be asked for
        ThoughtScorer(model, torch.Generator().manual_seed(5))
    got = ThoughtScorer(model, torch.Generator().manual_seed(5), ensemble=True)(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)


def test_baseline_uses_the_base_logits_and_differs_from_thoughts():
    model = make_model("llama", num_thought_tokens=2)
    randomize_mixing_head(model, scale=3.0)
    configure_for_scoring(model)
    ids, mask = short_batch(model.tokenizer)
    with torch.no_grad():
        base_logits = model(ids, attention_mask=mask).base_logits
    base_logits[..., list(model.thought_token_ids)] = float("-inf")
    baseline = BaseScorer(model.base, model.thought_token_ids)(ids, mask)
    thoughts = ThoughtScorer(model, greedy_thoughts=True)(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(baseline[real], base_logits.log_softmax(-1)[real], rtol=1e-4, atol=1e-5)
    text_columns = torch.isfinite(baseline[real])
    assert (baseline[real] - thoughts[real])[text_columns].abs().max() > 1e-2


def test_options_of_one_question_share_the_thoughts_over_the_prompt():
    model = make_model("llama", num_thought_tokens=2)
    randomize_mixing_head(model, scale=3.0)
    ids, mask = short_batch(model.tokenizer, ("Q: pick\nA: A", "Q: pick\nA: B"))
    configure_for_scoring(model)
    scorer = ThoughtScorer(model, torch.Generator().manual_seed(0))
    shared = scorer(ids, mask, shared_prefix=ids.shape[1] - 1)
    torch.testing.assert_close(shared[0, :-1], shared[1, :-1])
    independent = scorer(ids, mask)
    text_columns = torch.isfinite(independent[0, :-1])
    assert (independent[0, :-1] - independent[1, :-1])[text_columns].abs().max() > 1e-3


def test_csqa_accuracy_picks_the_option_with_the_highest_log_likelihood():
    tok = byte_tokenizer()
    for key in "AC":
        boosted = UniformScorer(len(tok), (tok.convert_tokens_to_ids(key), 5.0))
        score, records = protocols.run_csqa_accuracy(CSQA_ROWS, boosted, tok, "cpu")
        assert [r["prediction"] for r in records] == [key, key]
        assert score == {"A": 0.5, "C": 0.0}[key]
    total = len(tok) + 4  # " " then "C": 1 / total, then 5 / total
    assert records[0]["option_logprobs"]["C"] == pytest.approx(math.log(1 / total) + math.log(5 / total))


# ------------------------------------------------------------------------------ GSM8K chain of thought
def test_answer_extraction_reasoning_cut_and_majority_vote():
    assert prompts.extract_first_integer(" $1,250 in total, or 3") == 1250
    assert prompts.extract_first_integer(" -7 degrees") == 7  # the official code ignores signs
    assert prompts.extract_first_integer(" none") is None
    assert prompts.cut_reasoning("2 + 2 = 4.\nQ: next question") == "2 + 2 = 4.\n"
    assert prompts.cut_reasoning("a\n\n\nb Q:") == "a"
    assert prompts.majority_vote([3, None, 5, 5, 3, 5]) == 5
    assert prompts.majority_vote([7, 3, 3, 7]) == 7  # ties go to the earliest
    assert prompts.majority_vote([None, None]) is None


class ScriptedGenerator:
    """Answers by script: records every call; reasoning contains a runaway new question to be cut."""

    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def __call__(self, texts, max_new_tokens, do_sample, temperature, stop_strings=()):
        self.calls.append((list(texts), max_new_tokens, do_sample, tuple(stop_strings)))
        if len(self.calls) % 2 == 1:
            return [" Two plus two is four.\nQ: junk"] * len(texts)
        return [self.answers.pop(0) for _ in texts]


def test_gsm8k_accuracy_prompts_votes_and_scores():
    generator = ScriptedGenerator([" 4.", " 5", " 4 apples", " 42", " 41", " nothing"])
    score, records = protocols.run_gsm8k_accuracy(GSM8K_ROWS, generator, batch_size=6, votes=3, temperature=0.9,
                                                  max_reasoning_tokens=50, answer_tokens=7)
    reasoning_call, answer_call = generator.calls
    assert reasoning_call[0][0] == "Q: What is 2 + 2?\nA: Let's think step by step." and len(reasoning_call[0]) == 6
    assert reasoning_call[1:] == (50, True, ("Q:", "\n\n\n"))
    assert answer_call[0][0] == ("Q: What is 2 + 2?\nA: Let's think step by step. Two plus two is four."
                                 "\nTherefore, the answer (arabic numerals) is")
    assert answer_call[1] == 7
    assert [r["votes"] for r in records] == [[4, 5, 4], [42, 41, None]]
    assert [(r["prediction"], r["gold"], r["correct"]) for r in records] == [(4, 4, True), (42, 42, True)]
    assert score == 1.0
    greedy = ScriptedGenerator([" 5", " 42"])
    score, _ = protocols.run_gsm8k_accuracy(GSM8K_ROWS, greedy, 4, 1, 0.9, 10, 3)
    assert greedy.calls[0][2] is False and score == 0.5


def test_chunked_generation_with_stops_equals_one_call_and_stops_early():
    model = make_model("llama", num_thought_tokens=2)
    randomize_mixing_head(model, scale=2.0)
    tok = model.tokenizer
    text_generator = generators.ThoughtTextGenerator(model, tok, greedy_thoughts=True)
    ids, mask = short_batch(tok, ("Q: a\nA:",))
    whole = model.generate(ids, mask, max_new_tokens=7, greedy_thoughts=True).sequences
    calls = []

    def chunk(i, m, n):
        calls.append(n)
        return text_generator.generate_chunk(i, m, n, False, 1.0)

    chunked = generators.generate_until_stop(chunk, ids, mask, 7, (), tok, chunk_tokens=3)
    assert torch.equal(chunked, whole) and calls == [3, 3, 1]
    first_chunk_text = generators.decode_continuation(tok, whole[0, ids.shape[1]:][:3])
    calls.clear()
    generators.generate_until_stop(chunk, ids, mask, 7, (first_chunk_text,), tok, chunk_tokens=3)
    assert calls == [3]
