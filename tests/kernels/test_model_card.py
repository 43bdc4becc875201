"""Tests for kernels/model_card.py: the JSON records every config shares, the card's weights check."""
from __future__ import annotations

import json

import pytest
from mbir_batch.kernels.denoiser import DenoiserConfig
from mbir_batch.kernels.model_card import DenoiserLoadError, card_weights, file_sha256
from mbir_batch.kernels.priors.adm import ADMConfig
from mbir_batch.kernels.priors.base import PriorConfig, PriorLoadError
from mbir_batch.kernels.priors.inspect import ModelReport
from mbir_batch.kernels.priors.ncsnpp import NCSNppConfig

RECORDS = [
    DenoiserConfig(resolution=16, channels=(8, 16), layers_per_block=1, norm_groups=4),
    ADMConfig(image_size=32, in_channels=1, model_channels=32, out_channels=2, num_res_blocks=1,
              attention_ds=(4, 8), channel_mult=(1.0, 2.0, 0.5)),
    NCSNppConfig(image_size=32, num_channels=1, centered=False, nf=32, ch_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(16,)),
    PriorConfig(format="own", architecture="edm", parameterization="edm", resolution=16, sigma_min=0.005,
                sigma_max=10.0, data_range=(0.0, 1.0), weights="as saved", source="m.json"),
    ModelReport(path="m.json", format="own", architecture="edm", parameterization="edm", parameters=10,
                resolution=16, schedule="EDM", sigma_min=0.005, sigma_max=10.0, data_range=(-1.0, 1.0),
                weights="EMA", sha256="ab", sha256_of="m.safetensors"),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_records_are_plain_json_and_read_back_equal(record):
    as_dict = record.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict  # tuples are written as lists
    assert list(as_dict) == [name for name in record.__dataclass_fields__]
    again = type(record).from_dict(json.loads(json.dumps(as_dict)))
    assert again == record and hash(again) == hash(record)
    with pytest.raises(ValueError, match=rf"^{type(record).__name__}: unknown keys \['bogus'\]$"):
        type(record).from_dict({**as_dict, "bogus": 1})


def test_card_weights_checks_presence_and_hash(tmp_path):
    weights = tmp_path / "m.safetensors"
    weights.write_bytes(b"weights")
    card = tmp_path / "m.json"
    assert card_weights(card, {}) == weights                                    # default name, no hash recorded
    assert card_weights(card, {"weights_sha256": file_sha256(weights)}) == weights
    with pytest.raises(DenoiserLoadError, match=r"other\.safetensors: weights file not found \(named by .*m\.json\)"):
        card_weights(card, {"weights": "other.safetensors"})
    with pytest.raises(PriorLoadError, match=r"m\.safetensors: corrupted \(sha256 differs from m\.json\)"):
        card_weights(card, {"weights_sha256": "0" * 64}, error=PriorLoadError)
