"""Foundation-model presets: every preset's output dimension and pooling (on the meta device: shapes without
gigabytes), pooling against the tokens on real small ViTs, local weights, and `shiftkit models`."""

import json

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner

from shiftkit.cli.main import cli
from shiftkit.core.errors import InvalidArgumentError, UnknownNameError
from shiftkit.models import PRESETS, build_preset, get_preset, list_models, load_encoder
from shiftkit.models.presets import PooledViT

#: parameter counts published on the model cards (millions): an independent check of the architecture arguments
CARD_PARAMS_M = {"uni": 303, "uni2-h": 681, "virchow2": 632, "h-optimus-0": 1134, "h-optimus-1": 1134,
                 "prov-gigapath": 1134, "kaiko-vits16": 21.7, "kaiko-vits8": 21.7, "kaiko-vitb16": 86, "kaiko-vitb8": 86,
                 "kaiko-vitl14": 304}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_has_its_output_dimension_and_size(name):
    p = get_preset(name)
    m = build_preset(name, device="meta")
    with torch.device("meta"):
        out = m(torch.empty(2, 3, p.input_size, p.input_size))
    assert tuple(out.shape) == (2, p.out_dim)
    params = sum(q.numel() for q in m.parameters()) / 1e6
    assert abs(params - CARD_PARAMS_M[name]) / CARD_PARAMS_M[name] < 0.01, params


def test_table_covers_every_preset():
    assert set(CARD_PARAMS_M) == set(PRESETS)


@pytest.mark.parametrize("pooling", ["cls", "mean", "cls+mean"])
def test_pooling_against_the_tokens(pooling):
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, reg_tokens=4, img_size=64).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        tokens = vit.forward_features(x)  # (3, 1 + 4 + 16, 384)
        out = PooledViT(vit, pooling)(x)
    cls, patches = tokens[:, 0], tokens[:, 5:].mean(1)  # the four register tokens are not patches
    expect = {"cls": cls, "mean": patches, "cls+mean": torch.cat([cls, patches], -1)}[pooling]
    torch.testing.assert_close(out, expect)


def test_preset_loads_local_weights_and_embeds(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "w.safetensors"))
    enc = load_encoder("kaiko-vits16", weights=str(tmp_path / "w.safetensors"))
    assert enc.input_size == 224 and tuple(enc.mean) == (0.5, 0.5, 0.5) and "preset kaiko-vits16" in enc.info["architecture"]
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expect = vit.eval()((x - 0.5) / 0.5).numpy()
    np.testing.assert_allclose(enc.embed(x), expect, atol=1e-4)
    random = load_encoder("kaiko-vits16")
    assert "random, seed 0" in random.info["weights"] and random.embed(x).shape == (2, 384)
    assert np.array_equal(random.embed(x), load_encoder("KAIKO-VITS16").embed(x))  # seeded: the same weights
    bad = tmp_path / "other.safetensors"
    save_file({"foo": torch.zeros(3)}, str(bad))
    with pytest.raises(InvalidArgumentError, match="do not fit"):
        load_encoder("kaiko-vits16", weights=str(bad))


def test_unknown_preset_and_fixed_size_are_errors():
    with pytest.raises(UnknownNameError, match="uni2-h"):
        get_preset("uni2h")
    with pytest.raises(InvalidArgumentError, match="input_size"):
        build_preset("h-optimus-0", device="meta", input_size=448)
    assert list_models("kaiko-*") == ["kaiko-vitb16", "kaiko-vitb8", "kaiko-vitl14", "kaiko-vits16", "kaiko-vits8"]


def test_models_command_lists_the_presets():
    res = CliRunner().invoke(cli, ["models", "--json"])
    assert res.exit_code == 0
    rows = json.loads(res.stdout)
    assert {r["name"] for r in rows} == set(PRESETS)
    v = next(r for r in rows if r["name"] == "virchow2")
    assert v["dim"] == 2560 and v["pooling"] == "cls+mean"
