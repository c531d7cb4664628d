"""Run one evaluation: :class:`EvalSettings` in, :class:`~quietstar.evaluation.result.EvalResult` out.

    from quietstar.evaluation import EvalSettings, evaluate
    result = evaluate(EvalSettings(model="runs/ckpt", task="gsm8k", protocol="paper", limit=200))

With thoughts, the distribution at position j is the softmax of the mixed logits ``out.logits[:, 0, j, 0]`` after
one sampled thought; ``num_thoughts=N`` averages the probabilities of N thoughts instead (the paper's protocol: an
ensemble, labelled so in the results). ``thoughts="null"`` scores the filler control; ``zero_weight=True`` forces the
mixing weight to 0, which leaves the trained model's own text path inside the same expanded forward
(``out.base_logits``): the base model only for a protected text path, the fine-tuned LM otherwise (equal to
``baseline=True`` up to rounding, never to the original base model by construction). ``baseline=True`` uses the LM
without thoughts: its plain forward, which equals ``out.base_logits`` (tested). A thinking result records the mixing
weight w over the scored positions (mean and quantiles, ``EvalResult.mixing_weight``).

Only the first lookahead slot (s = 0) is needed to score or generate, so the model runs with
``num_lookahead_tokens = 1`` here (``quietstar.scoring.configure_for_scoring``): the s = 0 logits do not depend on
A (the lookahead tokens come after <|endofthought|> in the branch), and the work per position drops from
T + A + 1 to T + 2 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..checkpoint import is_quietstar_save
from ..padding import ensure_pad_token
from ..scoring import BaseScorer, ThoughtScorer, configure_for_scoring
from .data import SOURCES, TASKS, load_task
from .generators import BaseTextGenerator, ThoughtTextGenerator
from .protocols import PROTOCOLS, run_csqa_accuracy, run_gsm8k_accuracy, run_paper
from .result import ACCURACY_METRIC, PAPER_METRIC, EvalResult

DTYPES = ("float32", "bfloat16", "float16")
# The thought sources an evaluation offers: other_document and causal_shuffle are held-out views (quietstar.report):
# a CommonsenseQA batch holds the options of one question, and answers sit at the end of short prompts.
EVAL_THOUGHTS = ("sampled", "null")
POSITIVE_SETTINGS = ("num_thoughts", "num_thought_tokens", "votes", "batch_size", "answer_tokens",
                     "max_reasoning_tokens", "limit")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class EvalSettings:
    """What to evaluate and how; the fields are the options of ``quietstar-eval`` (``--num-thoughts`` for
    ``num_thoughts``, ...), whose ``--help`` explains each."""

    model: str  # a Quiet-STaR folder; with baseline also a plain HF model folder or an offline model name
    task: str  # one of TASKS
    protocol: str  # one of PROTOCOLS
    output: str | None = None  # where to write the results JSON (None: not written)
    limit: int | None = None  # the first N items (None: all)
    baseline: bool = False  # the LM without thoughts
    num_thoughts: int = 1  # above 1: an ensemble averaging the probabilities of N thoughts
    thoughts: str = "sampled"  # one of EVAL_THOUGHTS
    zero_weight: bool = False  # the mixing weight forced to 0: the trained model's text path
    num_thought_tokens: int | None = None  # T (None: the checkpoint's)
    greedy_thoughts: bool = False
    votes: int = 8  # accuracy/gsm8k: samples per problem for the majority vote
    temperature: float = 0.9  # accuracy/gsm8k: sampling temperature (votes > 1)
    max_reasoning_tokens: int = 384  # accuracy/gsm8k
    answer_tokens: int = 12  # accuracy/gsm8k: tokens after the answer cue
    seed: int = 42
    batch_size: int = 8  # sequences per forward/generate call
    device: str = field(default_factory=default_device)
    dtype: str = "float32"  # one of DTYPES
    data_source: str = "auto"  # one of quietstar.evaluation.data.SOURCES

    def __post_init__(self):
        for name, valid in (("task", TASKS), ("protocol", PROTOCOLS), ("thoughts", EVAL_THOUGHTS), ("dtype", DTYPES),
                            ("data_source", SOURCES)):
            if getattr(self, name) not in valid:
                raise ValueError(f"Unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}.")
        for name in POSITIVE_SETTINGS:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 1, got {value}.")
        if self.zero_weight and (self.baseline or self.thoughts != "sampled"):
            raise ValueError("zero_weight (--zero-weight) scores the mixed prediction with w = 0; it cannot be "
                             "combined with baseline (--baseline) or other thoughts (--thoughts): drop one of them.")

    def recorded(self, ensemble: bool) -> dict:
        """The settings a result records: those that shape its numbers (votes and the rest for GSM8K accuracy)."""
        names = ["seed", "batch_size", "limit", "greedy_thoughts", "dtype", "device", "num_thoughts", "thoughts"]
        values = {name: getattr(self, name) for name in names} | {"ensemble": ensemble}
        if self.zero_weight:  # recorded only when set, so results written before it read back unchanged
            values["zero_weight"] = True
        if self.protocol == "accuracy" and self.task == "gsm8k":
            values |= {name: getattr(self, name) for name in ("votes", "temperature", "max_reasoning_tokens",
                                                              "answer_tokens")}
        return values


@dataclass
class EvalInputs:
    """The data and the model of an evaluation: ``rows`` (quietstar.evaluation.data), where they came from, the
    Quiet-STaR model (None for a plain LM), the LM that scores without thoughts, and its tokenizer."""

    rows: list[dict]
    data_source: str
    model: object | None
    lm: object
    tokenizer: object


def load_model(path: str, baseline: bool, device: str, dtype: torch.dtype):
    """``(quietstar_model or None, lm, tokenizer)``. A plain transformers model is accepted only with ``baseline``;
    ``path`` may be an offline model name (quietstar.assets.resolve_model)."""
    from ..assets import resolve_model

    path = resolve_model(path)
    if is_quietstar_save(path):
        from ..modeling import QuietStarForCausalLM

        model = QuietStarForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        lm, tokenizer = model.base, model.tokenizer
    elif baseline:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = None
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        raise ValueError(f"{path} is not a Quiet-STaR folder (no quietstar_config.json); a plain model can only be "
                         "evaluated with --baseline.")
    ensure_pad_token(tokenizer)
    return model, lm, tokenizer


def prepare(settings: EvalSettings) -> EvalInputs:
    """Load the data and the model ``settings`` name. Raises DataUnavailableError / ValueError / FileNotFoundError
    with a message for the user."""
    rows, data_source = load_task(settings.task, settings.limit, settings.data_source)
    model, lm, tokenizer = load_model(settings.model, settings.baseline, settings.device,
                                      getattr(torch, settings.dtype))
    return EvalInputs(rows, data_source, model, lm, tokenizer)


def evaluate(settings: EvalSettings, inputs: EvalInputs | None = None) -> EvalResult:
    """Run the evaluation ``settings`` describes on ``inputs`` (by default :func:`prepare`'s); the result is also
    written to ``settings.output`` when given. A Quiet-STaR model is left set up for scoring (A = 1, N and T as
    asked)."""
    inputs = inputs if inputs is not None else prepare(settings)
    model, lm, tokenizer = inputs.model, inputs.lm, inputs.tokenizer
    torch.manual_seed(settings.seed)
    use_thoughts = not settings.baseline
    if model is not None:
        configure_for_scoring(model, settings.num_thoughts, settings.num_thought_tokens)
    thought_ids = model.thought_token_ids if model is not None else ()
    generator = torch.Generator(device=settings.device).manual_seed(settings.seed)
    ensemble = use_thoughts and settings.num_thoughts > 1
    scorer = (ThoughtScorer(model, generator, settings.greedy_thoughts, thoughts=settings.thoughts, ensemble=ensemble,
                            zero_weight=settings.zero_weight)
              if use_thoughts else BaseScorer(lm, thought_ids))
    if settings.protocol == "paper":
        score, records = run_paper(settings.task, inputs.rows, scorer, tokenizer, settings.batch_size, settings.device)
    elif settings.task == "commonsense_qa":
        score, records = run_csqa_accuracy(inputs.rows, scorer, tokenizer, settings.device)
    else:
        text_generator = (ThoughtTextGenerator(model, tokenizer, generator, settings.greedy_thoughts) if use_thoughts
                          else BaseTextGenerator(lm, tokenizer, thought_ids))
        score, records = run_gsm8k_accuracy(inputs.rows, text_generator, settings.batch_size, settings.votes,
                                            settings.temperature, settings.max_reasoning_tokens,
                                            settings.answer_tokens)
    result = EvalResult(
        task=settings.task, protocol=settings.protocol, model=settings.model, baseline=settings.baseline, score=score,
        n=len(records), data_source=inputs.data_source,
        metric=PAPER_METRIC if settings.protocol == "paper" else ACCURACY_METRIC,
        quietstar_config=model.quietstar_config.to_dict() if model is not None else None,
        settings=settings.recorded(ensemble), items=records,
        mixing_weight=(scorer.weight_summary() if isinstance(scorer, ThoughtScorer) and not settings.zero_weight
                       and scorer.weights else None))
    if settings.output is not None:
        result.save(settings.output)
    return result
