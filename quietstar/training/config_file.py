"""Run configuration: a flat YAML file gives defaults, command-line flags override them.

``scripts/train.py --config configs/x.yaml --learning_rate 1e-5`` fills six dataclasses with
``transformers.HfArgumentParser``: ModelArguments, DataArguments, QuietStarConfig (what the model is, saved with it),
QuietStarTrainingArguments, QuietStarLossConfig (how the loss is weighed: the run's) and AttentionSettings (how
attention runs in this process). Every YAML key must be a field of one of them; a misspelt key or a value of the
wrong type is refused with a message that names it. YAML values are checked against the field types (so ``1e-6``,
which YAML reads as a string, is accepted as a float).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from enum import Enum
from typing import Any, Literal, NamedTuple, Union

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from ..attention import AttentionSettings
from ..config import QuietStarConfig
from ..loss_config import QuietStarLossConfig
from .arguments import DataArguments, ModelArguments, QuietStarTrainingArguments


class RunArguments(NamedTuple):
    """The parsed run, one dataclass per lifetime of its settings."""

    model: ModelArguments
    data: DataArguments
    quietstar: QuietStarConfig
    training: QuietStarTrainingArguments
    loss: QuietStarLossConfig
    attention: AttentionSettings


ARGUMENT_CLASSES = (ModelArguments, DataArguments, QuietStarConfig, QuietStarTrainingArguments, QuietStarLossConfig,
                    AttentionSettings)  # in RunArguments' order


class ConfigError(ValueError):
    """A run configuration that cannot be used: unknown key, wrong type, or an invalid value."""


def did_you_mean(key: str, candidates) -> str:
    """' (did you mean 'x'?)' with the closest candidates, or '' when none is close."""
    matches = difflib.get_close_matches(key, list(candidates), n=3)
    return f" (did you mean {' or '.join(repr(m) for m in matches)}?)" if matches else ""


def field_types() -> dict[str, Any]:
    """Type hint of every init field of the argument classes, by field name."""
    hints = {}
    for cls in ARGUMENT_CLASSES:
        resolved = typing.get_type_hints(cls)
        hints.update({f.name: resolved[f.name] for f in dataclasses.fields(cls) if f.init})
    return hints


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(member) for member in typing.get_args(hint))
    if isinstance(hint, type) and issubclass(hint, Enum):
        return f"one of {[member.value for member in hint]}"
    if typing.get_origin(hint) is Literal:
        return f"one of {list(typing.get_args(hint))}"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


# field type -> (parser of a YAML string, the non-string YAML values it accepts as they are)
_SCALARS = {bool: (string_to_bool, bool), int: (int, int), float: (float, (int, float)), str: (str, str)}


def coerce(value, hint):
    """``value`` as the field type ``hint`` wants it (strings are parsed); TypeError/ValueError when impossible."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for member in args:
            if member is not type(None):
                try:
                    return coerce(value, member)
                except (TypeError, ValueError, argparse.ArgumentTypeError):
                    continue
        raise TypeError
    if hint is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        raise ValueError
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise TypeError
        return [coerce(item, args[0]) for item in value] if args else value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise TypeError
        return value
    if hint in _SCALARS:
        parse, accepted = _SCALARS[hint]
        if isinstance(value, str):
            return parse(value)
        if isinstance(value, accepted) and (hint is bool or not isinstance(value, bool)):
            return value
        raise TypeError
    if isinstance(hint, type) and issubclass(hint, Enum):
        if isinstance(value, hint) or value in [member.value for member in hint]:
            return value
        raise ValueError
    return value


def load_yaml_config(path: str) -> dict[str, Any]:
    """The YAML file at ``path`` as {field: value}, every key known and every value of its field's type."""
    with open(path) as f:
        try:
            values = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must be a mapping of field: value, got a {type(values).__name__}.")
    hints = field_types()
    unknown = [key for key in values if key not in hints]
    if unknown:
        described = "; ".join(f"{key!r}{did_you_mean(str(key), hints)}" for key in unknown)
        raise ConfigError(
            f"{path}: unknown key(s) {described}. Keys must be fields of "
            f"{', '.join(cls.__name__ for cls in ARGUMENT_CLASSES)}; `scripts/train.py --help` lists them."
        )
    coerced = {}
    for key, value in values.items():
        try:
            coerced[key] = coerce(value, hints[key])
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise ConfigError(
                f"{path}: {key} must be {_type_name(hints[key])}, got {value!r} ({type(value).__name__})."
            ) from None
    return coerced


def _is_bool_or_literal(hint) -> bool:
    """Whether ``hint`` is ``bool | Literal[...]`` (as ``bf16: true | false | auto``)."""
    args = typing.get_args(hint)
    return (typing.get_origin(hint) in (Union, types.UnionType) and len(args) == 2 and args[0] is bool
            and typing.get_origin(args[1]) is Literal)


class RunArgumentParser(HfArgumentParser):
    """HfArgumentParser that also takes fields typed ``bool | Literal[...]``, which it refuses: their flag takes what a
    bool flag takes (true/false, yes/no, 1/0; bare ``--bf16`` is true) or one of the literals (``--bf16 auto``)."""

    @staticmethod
    def _parse_dataclass_field(parser, field: dataclasses.Field):
        if not _is_bool_or_literal(field.type):
            return HfArgumentParser._parse_dataclass_field(parser, field)

        def parse(value: str):
            try:
                return coerce(value, field.type)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                raise argparse.ArgumentTypeError(f"must be {_type_name(field.type)}, got {value!r}") from None

        parser.add_argument(f"--{field.name}", *([f"--{field.name.replace('_', '-')}"] if "_" in field.name else []),
                            type=parse, nargs="?", const=True, default=field.default,
                            help=field.metadata.get("help"))


def build_parser() -> HfArgumentParser:
    """The command-line parser of ``scripts/train.py``: ``--config`` plus every field of the argument classes."""
    parser = RunArgumentParser(ARGUMENT_CLASSES, description="Train a causal LM with Quiet-STaR.")
    parser.add_argument("--config", help="YAML file of field: value defaults; command-line flags override them.")
    return parser


def parse_config(argv: list[str] | None = None) -> RunArguments:
    """Parse ``argv`` (default: sys.argv[1:]): ``--config FILE`` gives defaults, the other flags override them.

    Raises ConfigError for a bad file or invalid values; argparse itself rejects malformed flags.
    """
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--config")
    config_path = pre_parser.parse_known_args(argv)[0].config
    parser = build_parser()
    if config_path:
        parser.set_defaults(**load_yaml_config(config_path))
    try:
        *parsed, _ = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except ValueError as error:
        source = f" (from {config_path} and the command line)" if config_path else ""
        raise ConfigError(f"Invalid configuration{source}: {error}") from error
    return RunArguments(*parsed)
