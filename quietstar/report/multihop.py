"""Whether learned thoughts carry content: six views of the answers of the multi-hop task (quietstar.tasks.multihop,
docs/design.md §7).

At each query's answer token a (the token after the query's ``:``), the thought at position a - 1 is replaced per
view; every view is scored with one thought per position (A = 1, N = 1) from the same learned draw:

* ``no_thoughts``: the LM alone (the model's base logits);
* ``null``: T filler tokens (the first token of ``thought_init_text``), the mixing path without information;
* ``learned``: the model's own sampled thought;
* ``shuffled``: the learned thought of the document's next query (a cycle over its queries), so never its own:
  plausible but wrong content;
* ``gold``: the null thought with its last k - 1 slots replaced by the query's intermediate entities, in hop order,
  right before ``<|endofthought|>``; gold and null differ in exactly those tokens;
* ``gold_wrong``: the same with k - 1 other entities of the document, outside the query's chain.

A position's mixed prediction depends on its own thought only, so each view changes the thoughts at the query
positions alone. The views score a thought at every answer position; a model that thinks at anchors only
(``thought_fraction`` < 1) would think at an answer only where its rule chooses it (quietstar.scoring.scoring_anchors),
so for such a model each record also says whether the rule chose the answer position, and the summary adds the model
as deployed: the learned view where the rule chose the position, the text path's prediction (no thoughts) elsewhere.

For each view: the mean log p of the answer and the accuracy among the document's entities (argmax over their
tokens); paired differences with bootstrap intervals over documents; the fraction of the gold - null gap that learned
thoughts close; and the content check: how often a learned thought contains an intermediate entity's token, against
the chance rate of containing one of the decoys (k - 1 random other entities of the document).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..padding import right_pad
from ..scoring import scoring_anchors, thinks_at_anchors
from .stats import format_interval, paired_bootstrap, paired_bootstrap_ratio, verdict
from ..tasks.multihop import MultihopDocument, MultihopGenerator, MultihopSpec, gold_thought
from ..vocab import mask_thought_tokens

VIEWS = ("no_thoughts", "null", "learned", "shuffled", "gold", "gold_wrong")
THOUGHT_VIEWS = VIEWS[1:]
# "mixed": the model's prediction (what it outputs); "thought_path": the prediction from the thought alone (z_thought,
# before mixing), the reader. An untrained model's mixing head is zero, so its mixed views all equal no_thoughts and
# only the thought path says whether the reader can use an inserted intermediate.
PATHS = ("mixed", "thought_path")
COMPARISONS = (("learned", "shuffled"), ("learned", "null"), ("gold", "null"), ("gold", "gold_wrong"),
               ("learned", "no_thoughts"))


@dataclass
class MultihopEvalSettings:
    """What to score: held-out documents of each k (the "heldout" stream, which training never sees)."""

    hops: tuple[int, ...] = (1, 2, 3)
    num_documents: int = 40
    num_entities: int = 8
    num_queries: int = 6
    seed: int = 0  # the held-out documents' seed
    sampling_seed: int = 42  # the learned thoughts' draw
    greedy_thoughts: bool = False
    batch_size: int = 8
    num_resamples: int = 2000

    def __post_init__(self):
        self.hops = tuple(self.hops)
        for hops in self.hops:
            self.spec(hops)  # refuses a bad shape with MultihopSpec's message
        for name in ("num_documents", "batch_size", "num_resamples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")

    def spec(self, hops: int) -> MultihopSpec:
        return MultihopSpec(hops=hops, num_entities=self.num_entities, num_queries=self.num_queries)


def view_thoughts(view: str, learned: torch.Tensor, documents: Sequence[MultihopDocument],
                  filler_id: int) -> torch.Tensor:
    """The thoughts ``[B, 1, L, T]`` of ``view`` for a batch of documents (row b: documents[b]): the learned draw
    ``learned [B, 1, L, T]`` with the thought at each query's answer position - 1 replaced as the view says."""
    if view not in THOUGHT_VIEWS:
        raise ValueError(f"Unknown thought view {view!r}; use one of {THOUGHT_VIEWS}.")
    out = learned.clone()
    T = learned.shape[-1]
    for row, document in enumerate(documents):
        positions = [query.answer_index - 1 for query in document.queries]
        for number, query in enumerate(document.queries):
            if view == "null":
                content = torch.full((T,), filler_id)
            elif view == "shuffled":
                content = learned[row, 0, positions[(number + 1) % len(positions)]]
            elif view == "gold":
                content = torch.tensor(gold_thought(query.intermediates, T, filler_id))
            elif view == "gold_wrong":
                content = torch.tensor(gold_thought(query.decoys, T, filler_id))
            else:
                continue
            out[row, 0, positions[number]] = content.to(out.device)
    return out


@torch.no_grad()
def score_documents(model, documents: Sequence[MultihopDocument], generator: torch.Generator | None = None,
                    greedy: bool = False) -> list[dict]:
    """One record per query of ``documents`` (scored in one batch; ``row``: its document's index in the batch): the
    answer's log p and whether it wins among the document's entities under every view, the learned thought at the
    answer position - 1, and its content. ``model`` must think one thought per position
    (quietstar.scoring.configure_for_scoring)."""
    if model.quietstar_config.num_thoughts != 1:
        raise ValueError("Score with one thought per position: quietstar.scoring.configure_for_scoring(model).")
    device = next(model.parameters()).device
    input_ids, attention_mask = right_pad([d.input_ids for d in documents], model.pad_token_id, device)
    learned = model.sample_thoughts(input_ids, attention_mask, generator=generator, greedy=greedy)
    anchors = scoring_anchors(model, input_ids, attention_mask) if thinks_at_anchors(model) else None  # [B, M]
    log_probs = {path: {} for path in PATHS}  # path -> view -> [B, L, V]
    for view in THOUGHT_VIEWS:
        thoughts = view_thoughts(view, learned, documents, model.filler_token_id)
        out = model(input_ids, attention_mask=attention_mask, thoughts=thoughts)
        log_probs["mixed"][view] = out.logits[:, 0, :, 0].float().log_softmax(-1)  # thought tokens already -inf
        log_probs["thought_path"][view] = mask_thought_tokens(out.thought_logits[:, 0, :, 0].float(),
                                                              model.thought_token_ids).log_softmax(-1)
        if view == "null":
            base = mask_thought_tokens(out.base_logits.float(), model.thought_token_ids).log_softmax(-1)
            for path in PATHS:
                log_probs[path]["no_thoughts"] = base
    records = []
    for row, document in enumerate(documents):
        candidates = torch.tensor(document.candidate_ids, device=device)
        for number, query in enumerate(document.queries):
            position = query.answer_index - 1
            record = {"row": row, "query": number}
            for path in PATHS:
                record[path] = {"logp": {}, "correct": {}}
                for view in VIEWS:
                    distribution = log_probs[path][view][row, position]
                    record[path]["logp"][view] = float(distribution[query.answer.token_id])
                    winner = candidates[distribution[candidates].argmax()]
                    record[path]["correct"][view] = bool(winner == query.answer.token_id)
            thought = learned[row, 0, position].tolist()
            record["thought"], record["thought_text"] = thought, model.tokenizer.decode(thought)
            record["contains_answer"] = query.answer.token_id in thought
            if anchors is not None:
                record["at_anchor"] = bool((anchors[row] == position).any())
            if query.intermediates:
                record["contains_intermediate"] = any(e.token_id in thought for e in query.intermediates)
                record["contains_decoy"] = any(e.token_id in thought for e in query.decoys)
            records.append(record)
    return records


def _interval(values, documents, num_resamples):
    return paired_bootstrap(np.asarray(values, dtype=np.float64), documents, num_resamples=num_resamples)


def _path_summary(records: Sequence[dict], path: str, documents: np.ndarray, num_resamples: int) -> dict:
    """Views, paired differences and the gap closed of one prediction path."""

    def column(key, view):
        return np.asarray([r[path][key][view] for r in records], dtype=np.float64)

    views = {view: {"logp": _interval(column("logp", view), documents, num_resamples),
                    "accuracy": _interval(column("correct", view), documents, num_resamples)} for view in VIEWS}
    comparisons = {}
    for first, second in COMPARISONS:
        entry = {}
        for key, metric in (("logp", "logp"), ("correct", "accuracy")):
            interval = _interval(column(key, first) - column(key, second), documents, num_resamples)
            entry[metric] = interval | {"verdict": verdict(interval, lower_is_better=False)}
        comparisons[f"{first} - {second}"] = entry
    gold_gap = column("logp", "gold") - column("logp", "null")
    closed = None
    if gold_gap.sum() != 0:  # 0 at k = 1 (no intermediate: gold is null) and with a zero mixing head
        closed = paired_bootstrap_ratio(column("logp", "learned") - column("logp", "null"), gold_gap, documents,
                                        num_resamples=num_resamples)
    return {"views": views, "comparisons": comparisons, "gap_closed": closed}


def summarize(records: Sequence[dict], num_resamples: int = 2000) -> dict:
    """Per path (PATHS): means, paired differences and the gap closed of per-query ``records`` (each with its
    ``document``); and the content check. Every interval is a paired bootstrap over documents
    (quietstar.report.stats)."""
    documents = np.asarray([r["document"] for r in records])
    content = None
    if "contains_intermediate" in records[0]:
        hits = np.asarray([r["contains_intermediate"] for r in records], dtype=np.float64)
        chance = np.asarray([r["contains_decoy"] for r in records], dtype=np.float64)
        content = {"intermediate": _interval(hits, documents, num_resamples),
                   "chance": _interval(chance, documents, num_resamples),
                   "intermediate - chance": _interval(hits - chance, documents, num_resamples)}
    answers = np.asarray([r["contains_answer"] for r in records], dtype=np.float64)
    return {"num_documents": len(np.unique(documents)), "num_queries": len(records),
            **{path: _path_summary(records, path, documents, num_resamples) for path in PATHS},
            "content": content, "contains_answer": _interval(answers, documents, num_resamples),
            "deployed": _deployed_summary(records, documents, num_resamples)}


def _deployed_summary(records: Sequence[dict], documents: np.ndarray, num_resamples: int) -> dict | None:
    """For a model that thinks at anchors only (records with ``at_anchor``; None otherwise): how often its rule chose
    the answer position, and its mixed prediction as deployed (learned where chosen, no thoughts elsewhere): log p
    and accuracy, and their change from no thoughts, with intervals over documents."""
    if "at_anchor" not in records[0]:
        return None
    chosen = np.asarray([r["at_anchor"] for r in records])
    out = {"answer_at_anchor": _interval(chosen.astype(np.float64), documents, num_resamples)}
    for key, metric in (("logp", "logp"), ("correct", "accuracy")):
        learned, plain = (np.asarray([r["mixed"][key][view] for r in records], dtype=np.float64)
                          for view in ("learned", "no_thoughts"))
        deployed = np.where(chosen, learned, plain)
        change = _interval(deployed - plain, documents, num_resamples)
        out[metric] = _interval(deployed, documents, num_resamples)
        out[f"{metric} - no_thoughts"] = change | {"verdict": verdict(change, lower_is_better=False)}
    return out


def evaluate_multihop(model, settings: MultihopEvalSettings) -> dict:
    """Score held-out documents of every k in ``settings.hops``; ``{"settings", "hops": {k: summary and records}}``.
    ``model`` is set up for scoring by the caller (one thought per position, A = 1)."""
    results = {}
    for hops in settings.hops:
        generator = MultihopGenerator(model.tokenizer, settings.spec(hops))
        documents = generator.documents(settings.num_documents, settings.seed, "heldout")
        device = next(model.parameters()).device
        sampler = torch.Generator(device=device).manual_seed(settings.sampling_seed)
        records = []
        for first in tqdm(range(0, len(documents), settings.batch_size), desc=f"multi-hop k = {hops}", unit="batch"):
            batch = documents[first : first + settings.batch_size]
            records += [{"document": first + record.pop("row")} | record
                        for record in score_documents(model, batch, sampler, settings.greedy_thoughts)]
        results[hops] = summarize(records, settings.num_resamples) | {"example": documents[0].text,
                                                                        "records": records}
    return {"settings": vars(settings) | {"hops": list(settings.hops)}, "hops": results}


def markdown_table(result: dict) -> str:
    """The headline numbers of :func:`evaluate_multihop`'s result: per k and path, the views, the differences and
    the gap closed; then the content check."""
    lines = []
    for hops, summary in result["hops"].items():
        lines += [f"### k = {hops}: {summary['num_documents']} documents, {summary['num_queries']} queries", ""]
        for path in PATHS:
            entry = summary[path]
            lines += [f"**{path}** prediction", "", "| view | log p of the answer | accuracy |", "|---|---|---|"]
            lines += [f"| {view} | {format_interval(entry['views'][view]['logp'])} | "
                      f"{format_interval(entry['views'][view]['accuracy'])} |" for view in VIEWS]
            lines += ["", "| difference | log p | verdict | accuracy | verdict |", "|---|---|---|---|---|"]
            lines += [f"| {name} | {format_interval(c['logp'])} | {c['logp']['verdict']} | "
                      f"{format_interval(c['accuracy'])} | {c['accuracy']['verdict']} |"
                      for name, c in entry["comparisons"].items()]
            closed = entry["gap_closed"]
            lines += ["", "gap closed, (learned - null) / (gold - null): "
                      + (format_interval(closed) if closed else "n/a (gold - null is 0)"), ""]
        content = summary["content"]
        if content:
            lines.append(f"learned thought contains an intermediate: {format_interval(content['intermediate'])}; "
                         f"a decoy (chance): {format_interval(content['chance'])}; difference "
                         f"{format_interval(content['intermediate - chance'])}  ")
        lines.append(f"learned thought contains the answer: {format_interval(summary['contains_answer'])}  ")
        deployed = summary.get("deployed")
        if deployed:
            change = deployed["logp - no_thoughts"]
            lines.append(f"thinking at its anchors only, the model's rule chose "
                         f"{format_interval(deployed['answer_at_anchor'])} of the answer positions; as deployed "
                         "(learned thought where chosen, no thoughts elsewhere), mixed prediction: log p "
                         f"{format_interval(deployed['logp'])}, − no thoughts {format_interval(change)} "
                         f"{change['verdict']}; "
                         f"accuracy {format_interval(deployed['accuracy'])}, − no thoughts "
                         f"{format_interval(deployed['accuracy - no_thoughts'])}  ")
        lines.append("")
    return "\n".join(lines)
