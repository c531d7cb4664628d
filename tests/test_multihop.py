"""The multi-hop task (quietstar/tasks/multihop.py) and its six-view evaluation (quietstar/report/multihop.py):
the generator's invariants on a byte-level and a BPE tokenizer, the views' thoughts, their scores against the model
run on explicit sequences, the statistics, the training source and the command."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import make_model, randomize_mixing_head, transformers_eager
from quietstar.cli import multihop as multihop_cli
from quietstar.report import multihop as evaluation
from quietstar.report.multihop import PATHS, VIEWS, score_documents, summarize, view_thoughts
from quietstar.report.stats import paired_bootstrap_ratio
from quietstar.scoring import configure_for_scoring
from quietstar.tasks.multihop import ENTITY_WORDS, HOP_PHRASES, MultihopGenerator, MultihopSpec
from quietstar.tiny import byte_tokenizer
from quietstar.training import DataArguments, build_datasets, load_documents


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-like byte-level BPE trained here on sentences of the entity words and the task's template, so most
    entities are one token with their leading space (" cat"), as in a real vocabulary."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [f"Facts: {a} -> {b}. One step from {a}: {b}. Two steps from {b}: {a}. Three steps."
              for a, b in zip(ENTITY_WORDS, ENTITY_WORDS[1:] + ENTITY_WORDS[:1])] * 3
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


TOKENIZERS = {"bytes": byte_tokenizer, "bpe": bpe_tokenizer}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


# ---------------------------------------------------------------------------------------------- the generator
def parse_facts(text: str) -> dict[str, str]:
    """The mapping a document states, read back from its text alone."""
    facts = text.split("\n")[0]
    assert facts.startswith("Facts:")
    return dict(re.findall(r" (\w+) -> (\w+)\.", facts))


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_documents_state_a_cycle_and_answer_by_following_it(tokenizer, hops):
    generator = MultihopGenerator(tokenizer, MultihopSpec(hops=hops, num_entities=7, num_queries=5))
    for document in generator.documents(12, seed=3):
        mapping = parse_facts(document.text)
        names = [e.text for e in document.entities]
        assert sorted(mapping) == sorted(mapping.values()) == sorted(names)  # a permutation of the entities
        for query in document.queries:
            chain = [query.start.text]
            for _ in range(hops):
                chain.append(mapping[chain[-1]])
            assert [e.text for e in query.intermediates] == chain[1:-1] and query.answer.text == chain[-1]
            assert len(set(chain)) == hops + 1  # one cycle through all entities: no shortcut back
            prompt = f"{HOP_PHRASES[hops]} from {query.start.text}: "
            assert document.text[: query.answer_char].endswith(prompt)
            assert document.text[query.answer_char:].startswith(f"{query.answer.text}.")
            assert len(query.decoys) == hops - 1 and not {e.text for e in query.decoys} & set(chain)
            assert set(query.decoys) <= set(document.entities) and len(set(query.decoys)) == hops - 1
        # The thought that helps is different for every query: distinct intermediates at every hop.
        for level in range(hops - 1):
            assert len({q.intermediates[level] for q in document.queries}) == len(document.queries)
        assert len({q.start for q in document.queries}) == len(document.queries)


def test_entities_are_single_tokens_in_the_document(tokenizer):
    generator = MultihopGenerator(tokenizer, MultihopSpec(hops=2))
    for document in generator.documents(8):
        assert list(document.input_ids) == tokenizer(document.text)["input_ids"]
        for entity in document.entities:
            assert tokenizer.decode([entity.token_id]).strip() == entity.text
        for query in document.queries:
            assert document.input_ids[query.answer_index] == query.answer.token_id
            # The token before the answer ends the prompt at its ':' (the byte tokenizer's space token follows it).
            prompt = tokenizer.decode(document.input_ids[: query.answer_index])
            assert prompt.rstrip(" ").endswith(f"from {query.start.text}:")
        assert len(set(document.candidate_ids)) == len(document.entities)


def test_bpe_entities_are_words_and_byte_entities_are_letters():
    bpe = MultihopGenerator(bpe_tokenizer()).pool
    assert all(e.text in ENTITY_WORDS for e in bpe) and len(bpe) >= 16
    letters = MultihopGenerator(byte_tokenizer()).pool
    assert all(len(e.text) == 1 for e in letters)


def test_documents_are_deterministic_and_held_out_is_disjoint(tokenizer):
    spec = MultihopSpec(hops=2)
    first = MultihopGenerator(tokenizer, spec).documents(30, seed=5)
    again = MultihopGenerator(tokenizer, spec).documents(40, seed=5)
    assert first == again[:30]
    assert MultihopGenerator(tokenizer, spec).document(17, seed=5) == first[17]
    heldout = {d.text for d in MultihopGenerator(tokenizer, spec).documents(200, seed=5, split="heldout")}
    train = {d.text for d in MultihopGenerator(tokenizer, spec).documents(200, seed=5)}
    assert len(heldout) == len(train) == 200 and not heldout & train
    assert first[0] != MultihopGenerator(tokenizer, spec).document(0, seed=6)


def test_too_few_entities_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="too few single-token entities"):
        MultihopGenerator(byte_tokenizer(), MultihopSpec(num_entities=30, num_queries=4))
    for bad, message in ((dict(hops=9), "hops must be"), (dict(hops=3, num_entities=5), "at least max"),
                         (dict(num_queries=1), "num_queries"), (dict(num_entities=4, num_queries=5), "num_queries")):
        with pytest.raises(ValueError, match=message):
            MultihopSpec(**bad)
    with pytest.raises(ValueError, match="Unknown split"):
        MultihopGenerator(byte_tokenizer()).document(0, split="test")


# -------------------------------------------------------------------------------------------- training source
def test_training_source_is_the_train_stream_for_the_runs_tokenizer():
    tok = byte_tokenizer()
    args = DataArguments(dataset="synthetic-multihop", num_documents=6, multihop_hops=3, multihop_entities=6,
                         multihop_queries=3, max_length=512)
    expected = MultihopGenerator(tok, MultihopSpec(hops=3, num_entities=6, num_queries=3)).documents(6, seed=2)
    assert load_documents(args, seed=2, tokenizer=tok) == [d.text for d in expected]
    with pytest.raises(ValueError, match="pass the run's tokenizer"):
        load_documents(args)
    train, evaluation_set = build_datasets(dataclasses.replace(args, num_eval_documents=2), tok, min_tokens=4, seed=2)
    assert len(train) == 4 and len(evaluation_set) == 2
    assert train[0]["input_ids"].tolist() == list(expected[0].input_ids)
    with pytest.raises(ValueError, match="num_queries"):
        DataArguments(dataset="synthetic-multihop", multihop_queries=1)


# ------------------------------------------------------------------------------------------------ the views
T = 3


@pytest.fixture(scope="module")
def scoring_model():
    model = make_model("llama", num_thought_tokens=T)
    randomize_mixing_head(model, scale=2.0)
    configure_for_scoring(model)
    return model


def mixed_documents(tokenizer):
    """Two documents of different lengths (right padding in one batch): k = 2 and k = 3."""
    two = MultihopGenerator(tokenizer, MultihopSpec(hops=2, num_entities=4, num_queries=3)).document(0)
    three = MultihopGenerator(tokenizer, MultihopSpec(hops=3, num_entities=6, num_queries=4)).document(1)
    assert len(two.input_ids) != len(three.input_ids)
    return [two, three]


def test_view_thoughts_replace_only_the_query_positions_with_the_right_content():
    documents = mixed_documents(byte_tokenizer())
    width = max(len(d.input_ids) for d in documents)
    learned = torch.arange(len(documents) * width * T).view(len(documents), 1, width, T) + 1000  # all distinct
    filler = 7
    for view in ("null", "learned", "shuffled", "gold", "gold_wrong"):
        thoughts = view_thoughts(view, learned, documents, filler)
        for row, document in enumerate(documents):
            positions = [q.answer_index - 1 for q in document.queries]
            others = [p for p in range(width) if p not in positions]
            assert torch.equal(thoughts[row, 0, others], learned[row, 0, others])
            used = []
            for query, position in zip(document.queries, positions):
                got = thoughts[row, 0, position].tolist()
                k = len(query.intermediates) + 1
                expected = {"null": [filler] * T, "learned": learned[row, 0, position].tolist(),
                            "gold": [filler] * (T - k + 1) + [e.token_id for e in query.intermediates],
                            "gold_wrong": [filler] * (T - k + 1) + [e.token_id for e in query.decoys]}
                if view == "shuffled":
                    source = [p for p in positions if learned[row, 0, p].tolist() == got]
                    assert len(source) == 1 and source[0] != position  # another query's learned thought
                    used.append(source[0])
                else:
                    assert got == expected[view]
            if view == "shuffled":
                assert sorted(used) == sorted(positions)  # each learned thought moved once
    with pytest.raises(ValueError, match="do not fit"):
        view_thoughts("gold", learned[..., :1], documents, filler)


def explicit_log_probs(model, ids: list[int], position: int, thought: list[int]) -> dict[str, torch.Tensor]:
    """The slow definition: the plain LM (transformers' eager attention) on x_0..x_p, <sot>, thought, <eot>; the
    base prediction at x_p, the thought path's at <eot>, mixed by the mixing head. Log-probabilities ``[V]``."""
    sot, eot = model.thought_token_ids
    sequence = torch.tensor([ids[: position + 1] + [sot, *thought, eot]])
    with transformers_eager(model), torch.no_grad():
        hidden = model.body(inputs_embeds=model.embed(sequence)).last_hidden_state[0]
        base_hidden, thought_hidden = hidden[position], hidden[-1]
        weight = model.mixing_head(base_hidden, thought_hidden)
        logits = {"mixed": (1 - weight) * model.head_logits(base_hidden) + weight * model.head_logits(thought_hidden),
                  "thought_path": model.head_logits(thought_hidden), "no_thoughts": model.head_logits(base_hidden)}
    return {path: z.masked_fill(torch.isin(torch.arange(len(z)), torch.tensor([sot, eot])), float("-inf"))
            .log_softmax(-1) for path, z in logits.items()}


def check_against_explicit_sequences(model, documents):
    """score_documents' log p for every view, path and query equals the slow definition with the view's thought
    built independently here (the learned draw and the shuffled thought read from the calls score_documents made)."""
    calls = {"sampled": [], "forward": []}
    sample, forward = model.sample_thoughts, model.forward

    def record_sample(*args, **kwargs):
        calls["sampled"].append(sample(*args, **kwargs))
        return calls["sampled"][-1]

    def record_forward(*args, **kwargs):
        calls["forward"].append(kwargs["thoughts"].clone())
        return forward(*args, **kwargs)

    model.sample_thoughts, model.forward = record_sample, record_forward
    try:
        records = score_documents(model, documents, torch.Generator().manual_seed(0))
    finally:
        del model.sample_thoughts, model.forward
    learned = calls["sampled"][0]
    shuffled = calls["forward"][evaluation.THOUGHT_VIEWS.index("shuffled")]
    filler = model.filler_token_id
    records = iter(records)
    for row, document in enumerate(documents):
        ids = list(document.input_ids)
        for query in document.queries:
            record = next(records)
            p = query.answer_index - 1
            pad = [filler] * (T - len(query.intermediates))
            thoughts = {"null": [filler] * T, "learned": learned[row, 0, p].tolist(),
                        "shuffled": shuffled[row, 0, p].tolist(),
                        "gold": pad + [e.token_id for e in query.intermediates],
                        "gold_wrong": pad + [e.token_id for e in query.decoys]}
            for view, thought in thoughts.items():
                expected = explicit_log_probs(model, ids, p, thought)
                for path in PATHS:
                    assert record[path]["logp"][view] == pytest.approx(
                        float(expected[path][query.answer.token_id]), abs=1e-4), (view, path)
            assert record["mixed"]["logp"]["no_thoughts"] == pytest.approx(
                float(expected["no_thoughts"][query.answer.token_id]), abs=1e-4)
            candidates = [e.token_id for e in document.entities]
            best = candidates[int(expected["mixed"][candidates].argmax())]
            assert record["mixed"]["correct"]["gold_wrong"] == (best == query.answer.token_id)
            assert record["thought"] == learned[row, 0, p].tolist()


def test_scores_equal_the_model_on_explicit_sequences(scoring_model):
    check_against_explicit_sequences(scoring_model, mixed_documents(byte_tokenizer()))


def test_gold_inserted_one_position_early_fails_the_check(scoring_model, monkeypatch):
    right = evaluation.view_thoughts

    def early_gold(view, learned, documents, filler_id):
        if view != "gold":
            return right(view, learned, documents, filler_id)
        shifted = [dataclasses.replace(d, queries=tuple(dataclasses.replace(q, answer_index=q.answer_index - 1)
                                                        for q in d.queries)) for d in documents]
        return right(view, learned, shifted, filler_id)

    monkeypatch.setattr(evaluation, "view_thoughts", early_gold)
    with pytest.raises(AssertionError, match="gold"):
        check_against_explicit_sequences(scoring_model, mixed_documents(byte_tokenizer()))


def test_views_with_a_zero_mixing_head_equal_the_lm_alone():
    model = make_model("llama", num_thought_tokens=T)
    configure_for_scoring(model)
    records = score_documents(model, mixed_documents(byte_tokenizer()))
    for record in records:
        values = {record["mixed"]["logp"][view] for view in VIEWS}
        assert max(values) - min(values) < 1e-5
        assert record["thought_path"]["logp"]["gold"] != record["thought_path"]["logp"]["null"]
        assert "at_anchor" not in record  # it thinks everywhere: no rule to report
    assert summarize([{"document": r["row"]} | r for r in records], num_resamples=20)["deployed"] is None
    with pytest.raises(ValueError, match="one thought per position"):
        score_documents(make_model("llama", num_thought_tokens=T), mixed_documents(byte_tokenizer()))


def test_a_model_thinking_at_anchors_says_where_its_rule_thinks_and_scores_itself_as_deployed():
    """A q < 1 model thinks at an answer only where its rule chooses the position: the ceil(q n) positions of highest
    next-token entropy of the plain LM (computed here on each row alone, transformers' eager attention) among those
    with a real next token. Each record says whether the rule chose its answer position; as deployed, the model's
    prediction there is the learned view where chosen and the LM alone elsewhere."""
    import math

    fraction = 0.2
    model = make_model("llama", num_thought_tokens=T, thought_fraction=fraction)
    randomize_mixing_head(model, scale=2.0)
    configure_for_scoring(model)
    documents = mixed_documents(byte_tokenizer())
    records = score_documents(model, documents, torch.Generator().manual_seed(0))
    chosen = []
    for row, document in enumerate(documents):
        ids = torch.tensor(document.input_ids)
        with torch.no_grad(), transformers_eager(model):
            logits = model.base(inputs_embeds=model.embed(ids[None])).logits[0]
        keep = [v for v in range(logits.shape[-1]) if v not in model.thought_token_ids]
        entropy = torch.distributions.Categorical(logits=logits[:, keep].double()).entropy()
        count = math.ceil(round(fraction * len(ids), 9))
        expected = sorted(range(len(ids) - 1), key=lambda j: -entropy[j].item())[:count]
        for query, record in zip(document.queries, [r for r in records if r["row"] == row]):
            assert record["at_anchor"] == (query.answer_index - 1 in expected), (row, query.answer_index)
            chosen.append(record["at_anchor"])
    assert any(chosen) and not all(chosen)  # the check can fail both ways
    summary = summarize([{"document": r["row"]} | r for r in records], num_resamples=50)
    deployed = [r["mixed"]["logp"]["learned" if r["at_anchor"] else "no_thoughts"] for r in records]
    change = [d - r["mixed"]["logp"]["no_thoughts"] for d, r in zip(deployed, records)]
    assert summary["deployed"]["answer_at_anchor"]["mean"] == pytest.approx(np.mean(chosen))
    assert summary["deployed"]["logp"]["mean"] == pytest.approx(np.mean(deployed))
    assert summary["deployed"]["logp - no_thoughts"]["mean"] == pytest.approx(np.mean(change))
    assert any(c != 0 for c in change) and all(c == 0 for c, a in zip(change, chosen) if not a)
    assert "the model's rule chose" in evaluation.markdown_table({"hops": {2: summary}})


# ------------------------------------------------------------------------------------------------- statistics
def test_ratio_bootstrap_matches_a_loop_over_the_same_draws():
    rng = np.random.default_rng(0)
    documents = np.repeat(np.arange(7), 3)
    numerator, denominator = rng.normal(size=21), rng.normal(loc=2.0, size=21)
    result = paired_bootstrap_ratio(numerator, denominator, documents, num_resamples=300, seed=4)
    draws = np.random.default_rng(4).integers(0, 7, size=(300, 7))
    ratios = [sum(numerator[documents == d].sum() for d in draw) / sum(denominator[documents == d].sum() for d in draw)
              for draw in draws]
    assert result["mean"] == pytest.approx(numerator.sum() / denominator.sum())
    assert result["low"] == pytest.approx(np.quantile(ratios, 0.025)) and result["high"] == pytest.approx(
        np.quantile(ratios, 0.975))
    with pytest.raises(ValueError, match="no gap"):
        paired_bootstrap_ratio(numerator, np.zeros(21), documents)


def synthetic_records(num_documents=10, per_document=3, hops=2):
    """Records where learned closes exactly 40 % of the gold − null gap, and thoughts hold the intermediate in half
    of the queries and a decoy in none."""
    rng = np.random.default_rng(1)
    records = []
    for document in range(num_documents):
        for query in range(per_document):
            null = -3 + rng.normal()
            gap = 1 + rng.random()
            logp = {"no_thoughts": null, "null": null, "learned": null + 0.4 * gap, "shuffled": null,
                    "gold": null + gap, "gold_wrong": null - 0.1}
            correct = {view: value > null for view, value in logp.items()}
            record = {"document": document, "query": query, "thought": [1, 2],
                      "contains_answer": False, **{path: {"logp": logp, "correct": correct} for path in PATHS}}
            if hops > 1:
                record |= {"contains_intermediate": query % 2 == 0, "contains_decoy": False}
            records.append(record)
    return records


def test_summary_gives_the_gap_closed_and_the_content_check():
    summary = summarize(synthetic_records(), num_resamples=200)
    mixed = summary["mixed"]
    assert mixed["gap_closed"]["low"] == pytest.approx(0.4) and mixed["gap_closed"]["high"] == pytest.approx(0.4)
    assert mixed["comparisons"]["learned - shuffled"]["logp"]["verdict"] == "better"
    assert mixed["comparisons"]["learned - no_thoughts"]["accuracy"]["mean"] == 1.0
    assert summary["content"]["intermediate"]["mean"] == pytest.approx(20 / 30)
    assert summary["content"]["chance"]["mean"] == 0
    assert summary["num_documents"] == 10 and summary["num_queries"] == 30
    records = synthetic_records(hops=1)
    for record in records:  # k = 1: gold is null on both paths
        for path in PATHS:
            record[path] = {**record[path], "logp": {**record[path]["logp"], "gold": record[path]["logp"]["null"]}}
    one_hop = summarize(records, num_resamples=50)
    assert one_hop["thought_path"]["gap_closed"] is None
    assert one_hop["mixed"]["gap_closed"] is None and one_hop["content"] is None


# ---------------------------------------------------------------------------------------------------- command
def test_command_writes_the_record_and_the_table(tmp_path, capsys):
    model = make_model("llama", num_thought_tokens=2, num_thoughts=2)
    randomize_mixing_head(model)
    model.save_pretrained(tmp_path / "qs")
    output = tmp_path / "out" / "multihop.json"
    result = multihop_cli.main(["--model", str(tmp_path / "qs"), "--hops", "1", "2", "--documents", "3",
                                "--entities", "4", "--queries", "2", "--batch-size", "2", "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["untrained"] is False and sorted(saved["hops"]) == ["1", "2"]
    assert saved["hops"]["2"]["num_documents"] == 3 and len(saved["hops"]["2"]["records"]) == 6
    assert saved["hops"]["1"]["content"] is None and saved["hops"]["2"]["content"] is not None
    assert result["quietstar_config"]["num_thoughts"] == 1  # scored with one thought per position
    table = (tmp_path / "out" / "multihop.md").read_text()
    assert "learned - shuffled" in table and "k = 2" in table and table.strip() in capsys.readouterr().out
    with pytest.raises(SystemExit):
        multihop_cli.main(["--model", str(tmp_path / "qs"), "--hops", "3", "--entities", "4", "--output",
                           str(output)])
