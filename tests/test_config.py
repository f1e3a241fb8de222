"""The config copy: every dropout rate of every tuner, and nothing the caller owns changes."""

from __future__ import annotations

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

from safe_lora import dropout_rates
from safe_lora._config import prepared_copy

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
