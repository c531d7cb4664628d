"""lm-evaluation-harness model ``quietstar``: evaluate a Quiet-STaR checkpoint on any lm-eval task, thinking at every
token.

    pip install "quietstar[lmeval]"        # or: pip install lm-eval
    quietstar-lm-eval run --model quietstar \\
        --model_args pretrained=runs/ckpt,num_thoughts=2,greedy_thoughts=True --tasks arc_easy --device cpu

(``quietstar-lm-eval`` is the ``lm_eval`` command with the ``quietstar`` model registered; from a checkout also
``python -m eval.lm_eval_adapter``. From Python, ``import quietstar.evaluation.lm_eval_model`` registers it, then
``lm_eval.simple_evaluate(model="quietstar", ...)``.)

``QuietStarLM`` is lm-eval's ``HFLM`` with two model calls replaced:
- ``_model_call`` (all log-likelihood requests): the scorers of :mod:`quietstar.scoring`; the next-token
  distribution at position j is the mixed distribution after a thought, ``softmax(out.logits[:, n, j, 0])``
  averaged over the N thought samples, returned as log-probabilities ``[B, L, V]`` (HFLM's log_softmax leaves
  them unchanged).
- ``_model_generate`` (``generate_until``): ``QuietStarForCausalLM.generate``, a thought before every
  token, in chunks that stop once every row has reached a stop string or eos (:mod:`quietstar.evaluation.generators`).
``baseline=True`` evaluates the LM without thoughts (plain HFLM behaviour, thought tokens excluded).

Thoughts are sampled per request row, so two options of one question see different thoughts over their
shared context; ``greedy_thoughts=True`` makes thoughts a function of the prefix (shared and reproducible).
Every position thinks (cost ~ T + 2 tokens per position), which is what the log-likelihood needs.
"""

from __future__ import annotations

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:  # lm-eval is an optional extra
    raise ImportError(
        "The lm-eval model quietstar needs lm-evaluation-harness: pip install 'quietstar[lmeval]' "
        "(or pip install lm-eval)."
    ) from error

from ..modeling import QuietStarForCausalLM
from ..scoring import BaseScorer, ThoughtScorer, configure_for_scoring
from .generators import BaseTextGenerator, ThoughtTextGenerator, generate_until_stop


def _resolve_bool(value) -> bool:
    """``model_args`` arrive as strings ("True"/"false"/"1") from the command line."""
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


@register_model("quietstar")
class QuietStarLM(HFLM):
    """HFLM over a Quiet-STaR checkpoint (a folder from ``save_pretrained``, or a loaded model).

    Extra ``model_args``: ``num_thoughts`` (default 1; above 1 an ensemble of N thoughts), ``num_thought_tokens`` (T),
    ``greedy_thoughts``, ``baseline`` (no thoughts), ``seed`` (thought and sampling generator).
    """

    def __init__(self, pretrained, num_thoughts=None, num_thought_tokens=None, greedy_thoughts=False,
                 baseline=False, seed=0, **kwargs):
        self._overrides = {"num_thoughts": num_thoughts, "num_thought_tokens": num_thought_tokens}
        self.greedy_thoughts, self.baseline = _resolve_bool(greedy_thoughts), _resolve_bool(baseline)
        self._seed = int(seed)
        kwargs.setdefault("backend", "causal")
        if isinstance(pretrained, QuietStarForCausalLM):
            self.quietstar = pretrained.eval()
            kwargs.setdefault("tokenizer", pretrained.tokenizer)
            pretrained = pretrained.base
        super().__init__(pretrained=pretrained, **kwargs)
        self._configure()

    def _create_model(self, pretrained: str, dtype="auto", **kwargs) -> None:
        """Load the Quiet-STaR checkpoint; HFLM's ``self._model`` is its LM (config, device, tie_weights)."""
        if dtype in (None, "auto"):
            dtype = torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.quietstar = QuietStarForCausalLM.from_pretrained(pretrained, dtype=dtype).to(self.device).eval()
        self._model = self.quietstar.base

    def _configure(self) -> None:
        overrides = {k: int(v) for k, v in self._overrides.items() if v not in (None, "", "None")}
        configure_for_scoring(self.quietstar, **overrides)
        device = next(self.quietstar.parameters()).device
        self._generator = torch.Generator(device=device).manual_seed(self._seed)
        self._scorer = (BaseScorer(self.model, self.thought_token_ids) if self.baseline
                        else ThoughtScorer(self.quietstar, self._generator, self.greedy_thoughts,
                                           ensemble=self.quietstar.quietstar_config.num_thoughts > 1))

    def get_model_info(self) -> dict:
        """Parameter count and dtype of the whole Quiet-STaR model; no hub look-up (checkpoints are local folders)."""
        return {"model_num_parameters": sum(p.numel() for p in self.quietstar.parameters()),
                "model_dtype": str(self.model.dtype), "model_revision": self.revision, "model_sha": "",
                "quietstar_config": self.quietstar.quietstar_config.to_dict(), "baseline": self.baseline,
                "greedy_thoughts": self.greedy_thoughts}

    @property
    def thought_token_ids(self) -> list[int]:
        return list(self.quietstar.thought_token_ids)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Next-token log-probabilities ``[B, L, V]`` for right-padded ``inps`` (pad tokens only follow the
        scored positions, so they cannot change them)."""
        length = inps.shape[1]
        needed = 1 if self.baseline else self.quietstar.quietstar_config.num_lookahead_tokens + 2  # the shortest row
        if length < needed:
            pad = inps.new_full((inps.shape[0], needed - length), self.tokenizer.pad_token_id)
            inps = torch.cat([inps, pad], dim=1)
        return self._scorer(inps, torch.ones_like(inps))[:, :length]

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        """``[B, max_length]`` (or shorter when every row stopped): context, then thought-aware continuation."""
        attention_mask = generation_kwargs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(context)
        temperature = float(generation_kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = bool(generation_kwargs.pop("do_sample", temperature > 0)) and temperature > 0
        if self.baseline:
            text_generator = BaseTextGenerator(self.model, self.tokenizer, self.thought_token_ids)
        else:
            text_generator = ThoughtTextGenerator(self.quietstar, self.tokenizer, self._generator, self.greedy_thoughts)

        def chunk(ids, mask, n):
            return text_generator.generate_chunk(ids, mask, n, do_sample, temperature or 1.0)

        with torch.no_grad():
            return generate_until_stop(chunk, context, attention_mask, max_length - context.shape[1], stop or (),
                                       self.tokenizer)

