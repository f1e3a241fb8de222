"""The config: every dropout rate of every tuner, nothing the caller owns changes, and the file is read
with bounds and refused when PEFT would misread it (non-finite numbers, unknown fields, wrong types)."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
from peft import (
    AdaLoraConfig,
    BOFTConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftConfig,
    VeraConfig,
)
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

from safe_lora import AdapterConfigError, UnknownConfigFieldWarning, dropout_rates, load_for_inference
from safe_lora._config import (
    CONFIG_MAX_BYTES,
    means_absent,
    nonfinite_fields,
    parse_config,
    prepared_copy,
    read_config,
    read_config_json,
    wrong_types,
)
from safe_lora._readers import JSON_MAX_DEPTH as CONFIG_MAX_DEPTH
from safe_lora._readers import special_file
from safe_lora._source import CONFIG_NAME

CASES = [
    (LoraConfig(lora_dropout=0.1), {"lora_dropout": 0.1}),
    (AdaLoraConfig(lora_dropout=0.2, total_step=10), {"lora_dropout": 0.2}),
    (LoHaConfig(rank_dropout=0.2, module_dropout=0.3), {"rank_dropout": 0.2, "module_dropout": 0.3}),
    # rank_dropout_scale is a bool flag, not a rate
    (LoKrConfig(rank_dropout=0.4, module_dropout=0.5), {"rank_dropout": 0.4, "module_dropout": 0.5}),
    (VeraConfig(vera_dropout=0.1), {"vera_dropout": 0.1}),
    (BOFTConfig(boft_block_size=2, boft_dropout=0.1), {"boft_dropout": 0.1}),
    (OFTConfig(oft_block_size=2, r=0, module_dropout=0.1), {"module_dropout": 0.1}),
    (IA3Config(), {}),
]


@pytest.mark.parametrize(("config", "expected"), CASES, ids=[type(c).__name__ for c, _ in CASES])
def test_dropout_rates_of_every_tuner(config: PeftConfig, expected: dict[str, float]) -> None:
    assert dropout_rates(config) == pytest.approx(expected)


@pytest.mark.parametrize(("config", "expected"), CASES, ids=[type(c).__name__ for c, _ in CASES])
@pytest.mark.parametrize("dropout", [0.0, 0.25, None])
def test_prepared_copy_overrides_rates_and_leaves_the_original(
    config: PeftConfig, expected: dict[str, float], dropout: float | None
) -> None:
    config.inference_mode = False
    copy = prepared_copy(config, dropout=dropout, inference_mode=True)
    assert copy is not config
    assert copy.inference_mode is True
    assert config.inference_mode is False
    assert dropout_rates(config) == pytest.approx(expected)
    want = expected if dropout is None else dict.fromkeys(expected, dropout)
    assert dropout_rates(copy) == pytest.approx(want)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2.0])
def test_prepared_copy_rejects_rates_outside_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\) or None"):
        prepared_copy(LoraConfig(), dropout=bad, inference_mode=True)


# --- reading adapter_config.json: bounded, typed, faithful to PEFT ------------------------------------

CONFIG_CLASSES = sorted(
    {cls for cls in PEFT_TYPE_TO_CONFIG_MAPPING.values()}, key=lambda cls: cls.__name__
)  # every tuner the installed PEFT knows
# Arguments some config classes cannot be built without.
REQUIRED: dict[str, dict[str, Any]] = {
    "AdaLoraConfig": {"total_step": 10},
    "BOFTConfig": {"boft_block_size": 4},
    "OFTConfig": {"oft_block_size": 4, "r": 0},
    "CPTConfig": {
        "cpt_token_ids": [1, 2],
        "cpt_mask": [1, 1],
        "cpt_tokens_type_mask": [1, 2],
        "task_type": "CAUSAL_LM",
    },
    "AdaptionPromptConfig": {"adapter_len": 2, "adapter_layers": 1},
    "TrainableTokensConfig": {"token_indices": [1]},
}


def _saved_config(cls: type[PeftConfig], folder: Path, **extra: Any) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = cls(**{**REQUIRED.get(cls.__name__, {}), **extra})
        except ImportError as exc:  # AdaMSS needs scikit-learn
            pytest.skip(str(exc))
        config.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda cls: cls.__name__)
def test_every_config_class_reads_back_as_peft_reads_it(tmp_path: Path, cls: type[PeftConfig]) -> None:
    folder = _saved_config(cls, tmp_path)
    parsed = parse_config(read_config_json(folder / CONFIG_NAME), path=folder / CONFIG_NAME)
    assert parsed.unknown == {}  # no false alarm on anything save_pretrained writes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftConfig.from_pretrained(str(folder))
    assert type(parsed.config) is type(theirs)
    assert parsed.config.to_dict() == theirs.to_dict()
    assert read_config(folder).to_dict() == theirs.to_dict()


@pytest.mark.parametrize(
    ("raw", "fields"),
    [
        ({"lora_alpha": math.nan}, ["lora_alpha"]),
        ({"lora_alpha": math.inf, "r": -math.inf}, ["lora_alpha", "r"]),
        ({"alpha_pattern": {"fc1": math.nan, "fc2": 1.0}}, ["alpha_pattern.fc1"]),
        ({"layer_replication": [[0, 1], [1, math.inf]]}, ["layer_replication[1][1]"]),
        ({"lora_alpha": 1e308, "r": 8, "name": "NaN"}, []),  # huge but finite; a string
    ],
)
def test_nonfinite_fields_are_found_anywhere(raw: dict[str, Any], fields: list[str]) -> None:
    assert nonfinite_fields(raw) == fields


@pytest.mark.parametrize(
    ("value", "absent"),
    [
        *[(v, True) for v in (None, False, "", [], {})],
        *[(v, False) for v in (0, 0.0, True, "x", [None], {"a": None})],  # numbers are never "absent"
    ],
)
def test_means_absent_is_narrow(value: Any, absent: bool) -> None:
    assert means_absent(value) is absent


@pytest.mark.parametrize(
    ("values", "wrong"),
    [
        ({"monteclora_config": True}, ["monteclora_config"]),  # loads, then the first forward fails
        ({"use_dora": "no"}, ["use_dora"]),  # a truthy string switches DoRA on
        ({"modules_to_save": False, "target_modules": 3}, ["modules_to_save", "target_modules"]),
        ({"eva_config": {"rho": "high"}}, ["eva_config.rho"]),
        ({"layer_replication": [[0, 1, 2]]}, ["layer_replication"]),
        ({"rank_pattern": []}, ["rank_pattern"]),
        # what PEFT accepts and save_pretrained writes passes
        ({"lora_alpha": 16.0, "r": 8, "target_modules": "fc.*", "init_lora_weights": "pissa_niter_4"}, []),
        (
            {"task_type": "CAUSAL_LM", "bias": "lora_only", "layer_replication": [[0, 1]], "eva_config": {}},
            [],
        ),
        ({"layers_to_transform": 1, "trainable_token_indices": {"embed": [1]}, "loftq_config": {}}, []),
    ],
)
def test_values_of_the_wrong_type_are_found(values: dict[str, Any], wrong: list[str]) -> None:
    assert list(wrong_types(LoraConfig, values)) == wrong


def _edit(folder: Path, **changes: Any) -> None:
    path = folder / CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("changes", "error", "fields"),
    [
        ({"lora_alpha": math.nan}, "non-finite numbers.*lora_alpha", ["lora_alpha"]),
        (
            {"new_variant_config": {"r": 2}},
            r"does not know.*new_variant_config=\{'r': 2\}",
            ["new_variant_config"],
        ),
        ({"eva_config": {"rho": 2.0, "knob": 1}}, r"eva_config\.knob=1", ["eva_config.knob"]),
        ({"use_dora": "no"}, r"wrong type.*use_dora='no' \(expected bool\)", ["use_dora"]),
        ({"peft_type": "NOT_A_TUNER"}, "Unknown PEFT type", []),
    ],
)
def test_read_config_refuses_with_the_fields_named(
    tmp_path: Path, changes: dict[str, Any], error: str, fields: list[str]
) -> None:
    folder = _saved_config(LoraConfig, tmp_path)
    _edit(folder, **changes)
    with pytest.raises(AdapterConfigError, match=error) as caught:
        read_config(folder)
    assert caught.value.fields == fields
    assert caught.value.path == str(folder / CONFIG_NAME)


def test_unknown_fields_meaning_absent_warn_and_are_dropped(tmp_path: Path) -> None:
    folder = _saved_config(LoraConfig, tmp_path, r=4)
    _edit(folder, use_new_thing=False, new_thing_config=None)
    with pytest.warns(UnknownConfigFieldWarning, match="new_thing_config, use_new_thing") as caught:
        config = read_config(folder)
    assert caught[0].filename == __file__  # blamed on the caller, not on safe_lora
    assert config.r == 4
    assert not hasattr(config, "use_new_thing")


def test_the_warning_points_at_the_callers_line(tmp_path: Path) -> None:
    from conftest import make_mlp, save_adapter

    folder = save_adapter(
        make_mlp(), LoraConfig(target_modules=["fc1"], init_lora_weights=False), tmp_path / "a"
    )
    _edit(folder, use_new_thing=False)
    with pytest.warns(UnknownConfigFieldWarning) as caught:
        load_for_inference(make_mlp(), folder)
    assert [w.filename for w in caught if w.category is UnknownConfigFieldWarning] == [__file__]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_file_describes_without_opening(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert special_file(tmp_path / "fifo") == "a FIFO (named pipe)"  # returns: nothing blocked
    assert special_file(tmp_path / "dir") == "a directory"
    assert special_file(Path("/dev/zero")) == "a character device"
    assert special_file(tmp_path / "file") is None
    assert special_file(tmp_path / "link") is None  # the hub cache links every file to a blob
    assert special_file(tmp_path / "dangling") == "missing"


def test_config_read_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / CONFIG_NAME
    path.write_bytes(b"{" + b" " * CONFIG_MAX_BYTES + b"}")  # one byte over
    with pytest.raises(AdapterConfigError, match="larger than 4 MiB"):
        read_config_json(path)
    path.write_text('{"a": ' + "[" * CONFIG_MAX_DEPTH + "]" * CONFIG_MAX_DEPTH + "}")
    with pytest.raises(AdapterConfigError, match=f"nested {CONFIG_MAX_DEPTH + 1} levels deep"):
        read_config_json(path)
    path.write_text('{"a": ' + "[" * (CONFIG_MAX_DEPTH - 1) + "]" * (CONFIG_MAX_DEPTH - 1) + "}")
    assert read_config_json(path) is not None
