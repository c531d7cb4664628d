"""Which causal-LM families of the installed transformers Quiet-STaR computes exactly: the record behind the README's
"Supported models" table.

For every model type in transformers' causal-LM mapping, a tiny random model is built from its default config (no
downloads), made small, given a short sliding window where the family has one (so rows cross it) and mixed local and
global layers where it has both. Each family ends in one of:

- ``agrees``: ``from_base`` accepts it and the parallel = sequential oracle holds (thought and base logits of the
  expanded pass equal the family's own eager attention on each explicit sequence, fp32);
- ``refused``: ``from_base`` or the forward refuses it, with the reason (the first line of the error);
- ``not built``: a tiny model could not be built from its config here, or its own forward fails on it (the family
  needs inputs or sizes this generic recipe does not give); not a Quiet-STaR verdict;
- ``DISAGREES``: accepted but computed wrongly. Never acceptable: tests/test_families.py fails on it.

    python tests/families_survey.py --write   # re-run the survey, rewrite docs/families.json and the README table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_FILE = os.path.join(ROOT, "docs", "families.json")
README_FILE = os.path.join(ROOT, "README.md")
TABLE_START, TABLE_END = "<!-- families table: start -->", "<!-- families table: end -->"
WINDOW = 5  # shorter than the oracle's rows plus a branch, so sliding windows are crossed
TOLERANCE = 1e-4  # relative, fp32
MAX_PARAMETERS = 30_000_000
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)
EXPERT_COUNTS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
EXPERTS_PER_TOKEN = ("num_experts_per_tok", "moe_topk", "n_group", "topk_group")


def causal_lm_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _configs(config) -> list:
    text = config.get_text_config()
    return [config] if text is config else [config, text]


def tiny_config(model_type: str, vocab_size: int):
    """The family's default config made tiny: 2 layers, width 64, 4 heads of 16, 4 experts, a short window."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    for part in _configs(config):
        for key, value in SIZES.items():
            if hasattr(part, key) or key in getattr(part, "attribute_map", {}):
                setattr(part, key, value)
        for key, value in list(vars(part).items()):
            if isinstance(value, bool) or not isinstance(value, int):
                continue
            if key.endswith("intermediate_size"):
                setattr(part, key, 128)
            elif key in EXPERT_COUNTS:
                setattr(part, key, 4)
            elif key in EXPERTS_PER_TOKEN:
                setattr(part, key, min(value, 2))
        part.vocab_size = vocab_size
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids of the family's own, larger vocabulary
            value = getattr(part, key, None)
            if isinstance(value, int) and value >= vocab_size:
                setattr(part, key, None)
        if getattr(part, "sliding_window", None):
            part.sliding_window = WINDOW
            if hasattr(part, "use_sliding_window"):
                part.use_sliding_window = True
        kinds = list(dict.fromkeys(getattr(part, "layer_types", None) or []))
        if kinds:  # one layer of each of the first two kinds (local and global where the family mixes them)
            part.layer_types = (kinds * 2)[:2] if len(kinds) > 1 else kinds * 2
    return config


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
    from transformers import AutoModelForCausalLM

    from quietstar import QuietStarConfig, QuietStarForCausalLM
    from quietstar.tiny import byte_tokenizer

    tokenizer = byte_tokenizer()
    try:
        config = tiny_config(model_type, len(tokenizer))
        with torch.device("meta"):  # count first: sub-configs the generic shrinking misses can be huge
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if size > MAX_PARAMETERS:
            return {"family": model_type, "status": "not built",
                    "detail": f"{size / 1e6:.0f}M parameters after generic shrinking (a sub-config keeps its size)"}
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():  # the family's own forward must run on this config before Quiet-STaR is judged
            base(input_ids=torch.arange(3, 10)[None], use_cache=False)
    except Exception as error:  # noqa: BLE001 - any failure to build is recorded, not raised
        return {"family": model_type, "status": "not built", "detail": _first_line(error)}
    try:
        model = QuietStarForCausalLM.from_base(base, tokenizer, QuietStarConfig(
            num_thought_tokens=2, num_lookahead_tokens=2, num_thoughts=1)).eval()
        error = oracle_error(model)
    except Exception as refusal:  # noqa: BLE001
        return {"family": model_type, "status": "refused", "detail": _first_line(refusal)}
    if error <= TOLERANCE:
        return {"family": model_type, "status": "agrees", "detail": f"relative error {error:.1e}"}
    return {"family": model_type, "status": "DISAGREES", "detail": f"relative error {error:.1e}"}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def survey(families: list[str] | None = None, progress: bool = False) -> dict:
    import transformers

    records = []
    for family in families or causal_lm_families():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            records.append(survey_family(family))
        if progress:
            print(f"{family}: {records[-1]['status']} ({records[-1]['detail']})", file=sys.stderr, flush=True)
    return {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0], "families": records}


REASONS = (  # (text in the refusal, the README's short reason); the full message stays in docs/families.json
    ("does not route through", "attention does not go through transformers' AttentionInterface"),
    ("mixes tokens outside attention", "mixes tokens outside attention (a convolution over time)"),
    ("attention layers but its config declares", "an encoder-decoder's decoder (more attention layers than declared)"),
    ("layers attend through", "some layers do not attend through the interface (linear-attention or state-space mixers)"),
    ("logits differ from", "its logits differ from the probe's: a computation outside the seam (a BERT-style prediction "
                           "transform, attention sinks, a layer the probe does not see)"),
    ("failed Quiet-STaR's probe", "its decoder does not hand final hidden states to its head"),
)


def _reason(detail: str) -> str:
    """A refusal's short reason, so families refused for one reason share a row."""
    for marker, reason in REASONS:
        if marker in detail:
            return reason
    return detail.split(": ", 1)[-1]


def short_reason(row: dict) -> str:
    """What the README says of one family's verdict: its short refusal reason, else nothing."""
    return _reason(row["detail"]) if row["status"] == "refused" else ""


def render_table(record: dict) -> str:
    """The README block: families that agree, then refusals grouped by reason, then what was not built here."""
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
    reasons: dict[str, list[str]] = {}
    for row in by_status.get("refused", []):
        reasons.setdefault(_reason(row["detail"]), []).append(row["family"])
    for reason, names in sorted(reasons.items(), key=lambda item: -len(item[1])):
        lines.append(f"| refused ({len(names)}): {reason.replace('|', '/')} | {', '.join(names)} |")
    not_built = [row["family"] for row in by_status.get("not built", [])]
    if not_built:
        lines.append(f"| not built from a generic tiny config here ({len(not_built)}) | {', '.join(not_built)} |")
    lines.append(TABLE_END)
    return "\n".join(lines)


def readme_table(readme: str) -> str | None:
    if TABLE_START not in readme or TABLE_END not in readme:
        return None
    start = readme.index(TABLE_START)
    return readme[start : readme.index(TABLE_END) + len(TABLE_END)]


def write(record: dict) -> None:
    with open(RECORD_FILE + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(RECORD_FILE + ".tmp", RECORD_FILE)
    with open(README_FILE) as f:
        readme = f.read()
    current = readme_table(readme)
    if current is None:
        raise SystemExit(f"{README_FILE} has no {TABLE_START} ... {TABLE_END} block to rewrite.")
    with open(README_FILE, "w") as f:
        f.write(readme.replace(current, render_table(record)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="Rewrite docs/families.json and the README table.")
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
