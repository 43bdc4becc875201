"""Every key of the full-size published AAPM checkpoints maps to the ported networks, shape for shape.

The key lists (``keys_full.json``) were taken from the original models built from the papers'
own configs: DDS ``configs/vp/AAPM256.yml`` and DiffusionMBIR ``AAPM_256_ncsnpp_continuous``.
The networks are built on the meta device (no memory, no weights).
"""
from __future__ import annotations

import json

import torch
import yaml
from mbir_batch.kernels.priors.adm import ADMUNet
from mbir_batch.kernels.priors.files import check_keys
from mbir_batch.kernels.priors.load_adm import adm_config_from_yaml
from mbir_batch.kernels.priors.load_score_sde import ema_names, parse_config
from mbir_batch.kernels.priors.ncsnpp import NCSNpp

from .conftest import ADM_DIR, NCSNPP_DIR


def full_adm_yaml() -> dict:
    """DDS's AAPM256.yml: the tiny YAML with the paper's sizes put back (see the fixture README)."""
    doc = yaml.safe_load((ADM_DIR / "AAPM32_tiny.yml").read_text())
    doc["data"]["image_size"] = 256
    doc["model"].update(image_size=256, num_channels=256, attention_resolutions="16", num_head_channels=64)
    del doc["model"]["channel_mult"]  # "" -> guided-diffusion's row for 256: (1, 1, 2, 2, 4, 4)
    return doc


def full_ncsnpp_config() -> dict:
    """DiffusionMBIR's AAPM_256_ncsnpp_continuous config: the tiny one with the paper's sizes."""
    doc = json.loads((NCSNPP_DIR / "config.json").read_text())
    doc["data"]["image_size"] = 256
    doc["model"].update(nf=128, ch_mult=[1, 2, 2, 2], num_res_blocks=4, attn_resolutions=[16])
    return doc


def test_full_adm_keys_and_shapes():
    listing = json.loads((ADM_DIR / "keys_full.json").read_text())
    arch, learn_sigma, schedule = adm_config_from_yaml(full_adm_yaml(), "AAPM256.yml")
    assert arch.channel_mult == (1, 1, 2, 2, 4, 4) and arch.attention_ds == (16,) and learn_sigma
    assert schedule["num_diffusion_timesteps"] == 1000
    with torch.device("meta"):
        net = ADMUNet(arch)
    file_keys = {k["key"]: k["shape"] for k in listing["keys"]}
    assert len(file_keys) == listing["num_keys"] == 362
    check_keys("keys_full.json", file_keys, net.state_dict())
    assert sum(p.numel() for p in net.parameters()) == listing["num_params"] == 374_022_658


def test_full_ncsnpp_keys_shapes_and_ema_order():
    listing = json.loads((NCSNPP_DIR / "keys_full.json").read_text())
    arch, schedule = parse_config(full_ncsnpp_config(), "AAPM_256_ncsnpp_continuous")
    assert schedule == {"sigma_min": 0.01, "sigma_max": 378.0, "num_scales": 2000}
    with torch.device("meta"):
        net = NCSNpp(arch)
    model_keys = [k["key"] for k in listing["model"]["keys"]]
    shapes = {k["key"]: k["shape"] for k in listing["model"]["keys"]}
    assert len(model_keys) == 522
    mapped = {k[len("module."):]: shapes[k] for k in model_keys if k != "module.sigmas"}
    check_keys("keys_full.json", mapped, net.state_dict(), rename=lambda k: "module." + k)
    # the unnamed EMA list is named by the model's key order without sigmas and the Fourier W
    names = ema_names(model_keys)
    listed = listing["ema"]["shadow_params"]
    assert len(names) == len(listed) == listing["ema"]["num_shadow_params"] == 520
    assert names == [p["param"] for p in listed]
    assert all(shapes[p["param"]] == p["shape"] for p in listed)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert ["module." + n for n in trainable] == names, "the port's parameter order is score_sde's"


def test_tiny_ema_map_matches_the_checkpoint_listing():
    listing = json.loads((NCSNPP_DIR / "keys_tiny.json").read_text())
    model_keys = [k["key"] for k in listing["model"]["keys"]]
    listed = listing["ema"]["shadow_params"]
    assert ema_names(model_keys) == [p["param"] for p in listed]


def test_the_shipped_ncsnpp_aapm256_config_builds_the_published_checkpoints_network():
    """configs/models/ncsnpp-aapm256.json (for checkpoint_185.pth users) gives every full-size key and shape."""
    from importlib import resources

    listing = json.loads((NCSNPP_DIR / "keys_full.json").read_text())
    shipped = json.loads((resources.files("mbir_batch.configs") / "models" / "ncsnpp-aapm256.json").read_text())
    arch, schedule = parse_config(shipped, "ncsnpp-aapm256.json")
    assert schedule == {"sigma_min": 0.01, "sigma_max": 378.0, "num_scales": 2000}
    with torch.device("meta"):
        net = NCSNpp(arch)
    shapes = {k["key"]: k["shape"] for k in listing["model"]["keys"] if k["key"] != "module.sigmas"}
    check_keys("keys_full.json", {k[len("module."):]: v for k, v in shapes.items()}, net.state_dict(),
               rename=lambda k: "module." + k)
