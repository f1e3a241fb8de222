"""Regular expressions in an adapter config, evaluated under a time bound and handed to PEFT as names.

PEFT reads several config fields as regular expressions and matches them, with Python's ``re``,
against every module name of the model (a ``str`` ``target_modules``, ``exclude_modules``, the keys
of ``rank_pattern`` / ``alpha_pattern`` and their kin, ``modules_to_save`` entries,
``layers_pattern``; see :data:`safe_lora._peft.PATTERN_FIELDS` for how each is applied). ``re`` has
no time limit, so a pattern that backtracks catastrophically (``"(.+)+!"``) hangs the process for
good, in PEFT's injection and in anything else that asks PEFT's matcher.

:func:`resolve_patterns` therefore decides every match once, with the ``regex`` module (``re``'s
syntax, with a ``timeout=``) under one time budget for the whole config, and writes the answers into
a copy of the config as patterns that name the matched modules literally -- alternations of escaped
names, pinned to the whole name -- so that the patterns PEFT then runs are linear and select exactly
the modules the originals did. Over the budget: :class:`~safe_lora.errors.AdapterConfigError`
naming the field.
"""

from __future__ import annotations

import copy
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import regex
from peft import PeftConfig

from safe_lora._peft import PatternField, Template, literal_lists, pattern_fields
from safe_lora.errors import AdapterConfigError

__all__ = ["PATTERN_BUDGET_S", "pattern_key", "resolve_patterns"]

# The time all pattern matching of one config may take, in seconds. Legitimate patterns over the
# module names of a large model take milliseconds; the bound only has to stop a pattern that would
# never finish, well inside the few seconds a refusal may cost.
PATTERN_BUDGET_S = 1.0

# A pattern that matches nothing (what a key that selected no module becomes).
_NOTHING = "(?!)"


@dataclass
class _Budget:
    deadline: float

    def left(self) -> float:
        return self.deadline - time.monotonic()


class _OverBudget(Exception):
    pass


def _compiled(template: Template, pattern: str) -> regex.Pattern[str]:
    """PEFT's template around ``pattern``, compiled with ``regex`` in ``re``-compatible mode."""
    body = {
        "fullmatch": pattern,
        "suffix": rf"(.*\.)?({pattern})$",
        "dotted-suffix": rf".*\.{pattern}$",
        "search": pattern,
        "segment": rf"(^|.*\.){pattern}($|\..*)",
        # The pattern's own match, to know which text located the layer index.
        "layer": rf"(?:^|.*?\.)(?P<safe_lora_text>{pattern})\.(?P<safe_lora_idx>\d+)\.",
    }[template]
    return regex.compile(body, flags=regex.VERSION0)


def _matches(
    template: Template, compiled: regex.Pattern[str], name: str, budget: _Budget
) -> regex.Match[str] | None:
    left = budget.left()
    if left <= 0:
        raise _OverBudget
    try:
        if template == "fullmatch":
            return compiled.fullmatch(name, timeout=left)
        if template == "search":
            return compiled.search(name, timeout=left)
        return compiled.match(name, timeout=left)
    except TimeoutError as exc:
        raise _OverBudget from exc


def _exact(template: Template, names: Sequence[str]) -> str:
    """A pattern that, applied by PEFT with ``template``, matches exactly ``names`` (and what the
    template itself adds around a match, e.g. children for ``segment``)."""
    if not names:
        return _NOTHING
    ordered = sorted(set(names))
    if template == "fullmatch":
        return "(?:" + "|".join(re.escape(n) for n in ordered) + ")"
    if template == "search":
        return "^(?:" + "|".join(re.escape(n) for n in ordered) + ")$"
    if template == "dotted-suffix":
        # The template consumes "<anything>." first: pin that prefix with a fixed-width lookbehind
        # per name, so only the whole name matches.
        parts = []
        for n in ordered:
            head, _, tail = n.rpartition(".")
            parts.append(f"(?<=^{re.escape(head + '.')}){re.escape(tail)}")
        return "(?:" + "|".join(parts) + ")"
    # "suffix" and "segment": the optional "<anything>." in front must be empty.
    return r"(?<![\s\S])(?:" + "|".join(re.escape(n) for n in ordered) + ")"


def _safe_entry(pattern: str) -> bool:
    """Whether a ``segment`` pattern is a plain dotted name, which ``re`` matches in linear time and
    which PEFT also compares literally (``modules_to_save`` entries are suffixes when wrapping)."""
    return re.fullmatch(r"[\w.\-]+", pattern) is not None


def resolve_patterns(
    config: PeftConfig,
    names: Sequence[str],
    *,
    where: str | os.PathLike[str] | None = None,
    budget_s: float = PATTERN_BUDGET_S,
) -> PeftConfig:
    """A copy of ``config`` whose regular-expression fields match exactly what they matched among
    ``names``, as literal names PEFT matches in linear time.

    Args:
        config: The adapter config (never modified).
        names: The module names PEFT will match against (:func:`safe_lora._peft.module_names_matched`),
            or, without a model, the module paths the weights file names.
        where: The config's path, for messages.
        budget_s: The time all matching may take, in seconds.

    Returns:
        The copy (``config`` itself when it holds no patterns).

    Raises:
        AdapterConfigError: A pattern is not a valid regular expression, or matching took longer than
            ``budget_s`` (``fields`` names the field).

    Example:
        >>> from peft import LoraConfig
        >>> config = LoraConfig(target_modules=r".*\\.q_proj")
        >>> resolve_patterns(config, ["a.q_proj", "a.k_proj"]).target_modules
        '(?:a\\\\.q_proj)'
    """
    fields = pattern_fields(config)
    lists = literal_lists(config)
    if not fields and not lists:
        return config
    resolved = copy.deepcopy(config)
    if lists:
        # Names, not patterns -- but PEFT compares every module with every entry, and condenses long
        # lists in quadratic time (_find_minimal_target_modules): a list of 150,000 made-up names takes
        # it hours. An entry selects a module it equals or is a dotted suffix of; the entries that
        # select nothing on this model are dropped, in linear time, and the rest kept as written --
        # except that up to 10 of them stay when none selects anything, so that PEFT says what it
        # says of such a list ("Target modules {...} not found"), naming them.
        suffixes = {
            ".".join(parts[i:]) for n in names if n for parts in [n.split(".")] for i in range(len(parts))
        }
        for name in lists:
            value = getattr(config, name)
            kept = [entry for entry in value if entry in suffixes] or list(value)[:10]
            setattr(resolved, name, type(value)(kept) if isinstance(value, (set, frozenset)) else kept)
    budget = _Budget(time.monotonic() + budget_s)
    for spec, name in fields:
        try:
            setattr(resolved, name, _resolve_field(spec, getattr(config, name), names, budget))
        except _OverBudget:
            raise AdapterConfigError(
                f"Adapter config pattern too slow in {_where(where)}: matching '{name}' against the "
                f"{len(names)} module names took over {budget_s:g} s — expected a regular expression "
                f"that selects modules in milliseconds (this one backtracks catastrophically, and PEFT "
                f"would match it with no time limit) — fix '{name}' in adapter_config.json.",
                path=where,
                fields=[name],
            ) from None
        except (regex.error, re.error) as exc:
            raise AdapterConfigError(
                f"Adapter config pattern invalid in {_where(where)}: '{name}' is not a valid regular "
                f"expression ({exc}) — expected what Python's re accepts — fix '{name}' in "
                f"adapter_config.json.",
                path=where,
                fields=[name],
            ) from exc
    return resolved


def _resolve_field(spec: PatternField, value: object, names: Sequence[str], budget: _Budget) -> object:
    template = spec.template
    if spec.kind == "str":
        assert isinstance(value, str)
        if value.lower() == "all-linear":  # PEFT's shorthand, not a pattern
            return value
        re.compile(value)  # PEFT would refuse what re refuses
        compiled = _compiled(template, value)
        return _exact(template, [n for n in names if _matches(template, compiled, n, budget)])
    if spec.kind == "keys":
        assert isinstance(value, dict)
        compiled_keys = []
        for key in value:
            re.compile(str(key))
            compiled_keys.append((key, _compiled(template, str(key))))
        won: dict[object, list[str]] = {key: [] for key in value}
        for n in names:
            # PEFT takes the first key (in the dict's order) that matches a module.
            for key, compiled in compiled_keys:
                if _matches(template, compiled, n, budget):
                    won[key].append(n)
                    break
        out: dict[str, object] = {}
        for index, (key, matched) in enumerate(won.items()):
            new = _exact(template, matched)
            out[new if matched else f"{_NOTHING}{index}"] = value[key]
        return out
    # "items": a list of patterns, or one pattern as a string (layers_pattern).
    items = [value] if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    new_items: list[str] = []
    for item in items:
        text = str(item)
        if template == "segment" and _safe_entry(text):
            new_items.append(text)
            continue
        re.compile(text)
        compiled = _compiled(template, text)
        hits = [m for n in names if (m := _matches(template, compiled, n, budget)) is not None]
        if template == "layer":
            texts = sorted({m.group("safe_lora_text") for m in hits})
            new_items.append("(?:" + "|".join(re.escape(t) for t in texts) + ")" if texts else _NOTHING)
        else:
            new_items.append(_exact(template, [m.string for m in hits]))
    return new_items[0] if isinstance(value, str) else new_items


def pattern_key(patterns: Mapping[str, object], name: str) -> str:
    r"""The key of ``patterns`` that selects module ``name``, as PEFT's ``get_pattern_key`` picks it
    (the first that matches ``(.*\.)?({key})$``; ``name`` itself when none does).

    Only for patterns :func:`resolve_patterns` made literal: they match in linear time.
    """
    return next((str(k) for k in patterns if re.match(rf"(.*\.)?({k})$", name)), name)


def _where(where: str | os.PathLike[str] | None) -> str:
    return repr(os.fspath(where)) if where is not None else "the config"
