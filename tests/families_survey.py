"""Which causal-LM families of the installed transformers Quiet-STaR computes exactly: the record behind the table of
docs/families.md.

For every model type in transformers' causal-LM mapping, a tiny random model is built from its default config (no
downloads), made small by tests/family_configs.py, given a short sliding window where the family has one (so rows
cross it) and mixed local and global layers where it has both. Each family ends in one of:

- ``agrees``: ``from_base`` accepts it and the parallel = sequential oracle holds (thought and base logits of the
  expanded pass equal the family's own eager attention on each explicit sequence, fp32);
- ``refused``: the library refuses it, with its reason (a ValueError raised by quietstar: ``from_base``'s checks);
- ``failed``: accepted or probed, then an error that is not the library's refusal (a crash in quietstar, a family
  call it makes that breaks, a probe failure only the quietstar attention causes): a bug to fix or to turn into a
  refusal. tests/test_families.py fails on it;
- ``not built``: the family's own model cannot be built or run alone here (a missing package, a draft model that
  needs its target's states); not a Quiet-STaR verdict;
- ``DISAGREES``: accepted but computed wrongly. Never acceptable: tests/test_families.py fails on it.

    python tests/families_survey.py --write   # re-run the survey, rewrite docs/families.json and docs/families.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings

import torch

from family_configs import causal_lm_class, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_FILE = os.path.join(ROOT, "docs", "families.json")
TABLE_FILE = os.path.join(ROOT, "docs", "families.md")
TABLE_START, TABLE_END = "<!-- families table: start -->", "<!-- families table: end -->"
TOLERANCE = 1e-4  # relative, fp32
MAX_PARAMETERS = 30_000_000
NOT_STANDALONE = {  # families whose causal-LM class cannot run on its own: no tiny model of theirs can be judged
    "gemma4_assistant": "a draft model for Gemma 4 that reads its target model's shared K/V (and whose default "
                        "config fails its own validation)",
    "gemma4_unified_assistant": "a draft model for Gemma 4 that needs its target model's shared K/V states",
}


def causal_lm_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _explicit_logits(model, sequence: torch.Tensor) -> torch.Tensor:
    """The family's own logits on one explicit sequence, with transformers' eager attention: ``[len, V]``."""
    model.base.set_attn_implementation("eager")
    try:
        return model.base(inputs_embeds=model.embed(sequence[None]), use_cache=False).logits[0].float()
    finally:
        model.base.set_attn_implementation("quietstar")


def oracle_error(model) -> float:
    """Largest relative error of the expanded pass against explicit sequences (base logits and every thought logit),
    on a batch with a left-padded and a right-padded row."""
    from quietstar.thoughts import sample_thoughts

    generator = torch.Generator().manual_seed(0)
    lengths, width = (9, 7), 9
    ids = torch.full((2, width), 1, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        span = slice(width - n, width) if row == 1 else slice(0, n)
        ids[row, span], mask[row, span] = torch.randint(0, 256, (n,), generator=generator), 1
    cfg = model.quietstar_config
    T, A = cfg.num_thought_tokens, cfg.num_lookahead_tokens
    sot, eot = model.thought_token_ids
    with torch.no_grad():
        thoughts = sample_thoughts(model, ids, mask.bool(), generator=generator)
        out = model(ids, attention_mask=mask, thoughts=thoughts)
        worst = 0.0
        for b in range(2):
            columns = mask[b].nonzero().flatten()
            real = ids[b][mask[b].bool()]
            pairs = [(out.base_logits[b, columns].float(), _explicit_logits(model, real))]
            for j in sorted({0, len(real) // 2, len(real) - A, len(real) - 1}):
                branch = torch.cat([real[: j + 1], torch.tensor([sot]), thoughts[b, 0, columns[j]], torch.tensor([eot]),
                                    real[j + 1 : j + A]])
                explicit = _explicit_logits(model, branch)
                first = j + 1 + T + 1  # the slot after <|endofthought|>
                count = min(A, len(branch) - first)
                pairs.append((out.thought_logits[b, 0, columns[j], :count].float(), explicit[first : first + count]))
            for ours, reference in pairs:
                scale = reference.abs().max().clamp(min=1e-6)
                worst = max(worst, float((ours - reference).abs().max() / scale))
    return worst


def survey_family(model_type: str) -> dict:
    """``{"family", "status", "detail"}`` for one model type."""
    from quietstar import QuietStarConfig, QuietStarForCausalLM
    from quietstar.tiny import byte_tokenizer

    tokenizer = byte_tokenizer()
    if model_type in NOT_STANDALONE:
        return {"family": model_type, "status": "not built", "detail": NOT_STANDALONE[model_type]}
    try:
        config = tiny_config(model_type, len(tokenizer))
        model_class = causal_lm_class(model_type)
        with torch.device("meta"):  # count first: a sub-config the shrinking misses can be huge
            size = sum(p.numel() for p in model_class._from_config(config).parameters())
        if size > MAX_PARAMETERS:
            return {"family": model_type, "status": "not built",
                    "detail": f"{size / 1e6:.0f}M parameters after shrinking (a sub-config keeps its size)"}
        torch.manual_seed(0)
        base = model_class._from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():  # the family's own forward must run on this config before Quiet-STaR is judged
            base(input_ids=torch.arange(3, 10)[None], use_cache=False)
    except Exception as error:  # noqa: BLE001 - any failure to build is recorded, not raised
        return {"family": model_type, "status": "not built", "detail": _first_line(error)}
    try:
        model = QuietStarForCausalLM.from_base(base, tokenizer, QuietStarConfig(
            num_thought_tokens=2, num_lookahead_tokens=2, num_thoughts=1)).eval()
        error = oracle_error(model)
    except Exception as raised:  # noqa: BLE001
        return {"family": model_type, "status": _verdict(raised, base), "detail": _first_line(raised)}
    if error <= TOLERANCE:
        return {"family": model_type, "status": "agrees", "detail": f"relative error {error:.1e}"}
    return {"family": model_type, "status": "DISAGREES", "detail": f"relative error {error:.1e}"}


def _raised_in_quietstar(error: BaseException) -> bool:
    """Whether the innermost frame that raised ``error`` is the library's own code."""
    import quietstar

    library = os.path.dirname(os.path.abspath(quietstar.__file__))
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(library + os.sep)


def _probe_passes_the_structure_without_our_attention(base) -> bool:
    """Whether the library's probe gets past the family's structure (its decoder -> final hidden states -> head
    split) with transformers' SDPA attention and mask in the place of the quietstar ones: if so, a probe failure
    was theirs."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from quietstar.attention import ATTENTION_NAME, padding_mask, quietstar_attention
    from quietstar.compat import check_model_supported

    AttentionInterface.register(ATTENTION_NAME, sdpa_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    try:
        check_model_supported(base)
    except ValueError as error:  # a refusal after the run (layers counted, logits compared) passed the structure
        return error.__cause__ is None
    finally:
        AttentionInterface.register(ATTENTION_NAME, quietstar_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, padding_mask)
    return True


def _verdict(raised: BaseException, base) -> str:
    """``refused`` for the library's own refusal (a ValueError raised by quietstar); ``failed`` for anything else:
    an error of another kind, one raised outside the library, or a probe failure the quietstar attention caused
    (the probe wraps whatever its run raised; the same probe with another attention tells whose it is)."""
    if not isinstance(raised, ValueError) or not _raised_in_quietstar(raised):
        return "failed"
    if raised.__cause__ is not None and _probe_passes_the_structure_without_our_attention(base):
        return "failed"
    return "refused"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def survey(families: list[str] | None = None, progress: bool = False) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()  # families' notices (slow kernels, sub-config attention) per build
    records = []
    for family in families or causal_lm_families():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            records.append(survey_family(family))
        if progress:
            print(f"{family}: {records[-1]['status']} ({records[-1]['detail']})", file=sys.stderr, flush=True)
    return {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0], "families": records}


REASONS = (  # (text in the error, the table's short reason); the full message stays in docs/families.json
    # refusals
    ("does not route through", "attention does not go through transformers' AttentionInterface"),
    ("mixes tokens outside attention", "its expanded pass differs from explicit sequences outside attention (a "
                                       "convolution over time, or positions not taken from position_ids)"),
    ("attention layers but its config declares", "an encoder-decoder's decoder (more attention layers than declared)"),
    ("layers attend through", "some layers do not attend through the interface (linear-attention or state-space mixers)"),
    ("logits differ from", "its logits differ from the probe's: a computation outside the seam (a BERT-style prediction "
                           "transform, attention sinks, a layer the probe does not see)"),
    ("has no num_hidden_layers", "its config does not say how many attention layers it has"),
    ("attends sparsely", "attends sparsely through a learned indexer (DeepSeek sparse attention)"),
    ("attends bidirectionally", "attends bidirectionally (an encoder)"),
    ("additive position bias", "passes an additive position bias to its attention"),
    ("keys per row", "adds key/value entries of its own beyond the call's tokens (compressed or memory entries)"),
    ("not one token table", "one input embedding table per audio codebook, not one token table"),
    ("cannot run from input vectors", "recovers token ids from its input vectors (Gemma 4's per-layer inputs), so "
                                      "thought tokens cannot enter as new vectors"),
    ("output head predicts", "its output head predicts fewer ids than its input table holds (input-only image or audio rows)"),
    ("failed Quiet-STaR's probe", "its decoder does not hand final hidden states to its head"),
)


def _reason(detail: str) -> str:
    """A refusal's or failure's short reason, so families refused (or failing) for one reason share a row."""
    for marker, reason in REASONS:
        if marker in detail:
            return reason
    return detail.split(": ", 1)[-1]


def short_reason(row: dict) -> str:
    """What the table says of one family's verdict: its short refusal or failure reason, else nothing."""
    return _reason(row["detail"]) if row["status"] in ("refused", "failed") else ""


def render_table(record: dict) -> str:
    """The table block: families computed wrongly, then those that agree, then failures and refusals grouped by
    reason, then what was not built here."""
    by_status: dict[str, list[dict]] = {}
    for row in record["families"]:
        by_status.setdefault(row["status"], []).append(row)
    lines = [TABLE_START,
             f"Surveyed by `tests/test_families.py` on transformers {record['transformers']} "
             f"({len(record['families'])} causal-LM families; full record in `docs/families.json`).", "",
             "| verdict | families |", "|---|---|"]
    for status in ("DISAGREES", "agrees"):
        names = [row["family"] for row in by_status.get(status, [])]
        if names:
            lines.append(f"| **{status}** ({len(names)}) | {', '.join(names)} |")
    for status in ("failed", "refused"):
        reasons: dict[str, list[str]] = {}
        for row in by_status.get(status, []):
            reasons.setdefault(_reason(row["detail"]), []).append(row["family"])
        label = "**failed**" if status == "failed" else status
        for reason, names in sorted(reasons.items(), key=lambda item: -len(item[1])):
            lines.append(f"| {label} ({len(names)}): {reason.replace('|', '/')} | {', '.join(names)} |")
    for row in by_status.get("not built", []):
        lines.append(f"| not built: {row['detail'].replace('|', '/')} | {row['family']} |")
    lines.append(TABLE_END)
    return "\n".join(lines)


def page_table(page: str) -> str | None:
    """The block between the table markers in ``page`` (the text of docs/families.md), markers included."""
    if TABLE_START not in page or TABLE_END not in page:
        return None
    start = page.index(TABLE_START)
    return page[start : page.index(TABLE_END) + len(TABLE_END)]


def write(record: dict) -> None:
    with open(RECORD_FILE + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(RECORD_FILE + ".tmp", RECORD_FILE)
    with open(TABLE_FILE) as f:
        page = f.read()
    current = page_table(page)
    if current is None:
        raise SystemExit(f"{TABLE_FILE} has no {TABLE_START} ... {TABLE_END} block to rewrite.")
    with open(TABLE_FILE, "w") as f:
        f.write(page.replace(current, render_table(record)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="Rewrite docs/families.json and docs/families.md.")
    parser.add_argument("families", nargs="*", help="Only these model types (default: all).")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, ROOT)
    record = survey(args.families or None, progress=True)
    if args.write:
        write(record)
    print(render_table(record))


if __name__ == "__main__":
    main()
