"""The PyTorch converter: safe loading, wrapper handling, strictness, the CLI and released layouts."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch
from parity import assert_parity, load_case, nchw_to_nhwc

import jvit
import jvit.convert
from jvit.checkpoint import load_variables
from jvit.convert import CheckpointFormatError, ConversionError, UnsafeCheckpointError
from jvit.convert.cli import main as convert_cli
from jvit.models.sot import HeadConfig

# ---------------------------------------------------------------------------------------------
# Safe loading
# ---------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``exec``: it writes a marker file (standing in for arbitrary code)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, zipfile):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save(
        {"model": {"w": torch.zeros(2)}, "extra": _Payload(str(marker))}, path, _use_new_zipfile_serialization=zipfile
    )

    with pytest.raises(UnsafeCheckpointError, match="Nothing from the file was executed") as err:
        jvit.convert.load_checkpoint_file(path)
    assert "builtins.exec" in str(err.value)  # named for legacy (non-zip) files too
    with pytest.raises(UnsafeCheckpointError):
        jvit.convert.load_torch_checkpoint(path, "sovit_7")
    assert convert_cli([str(path), "--model", "sovit_7", "--output", str(tmp_path / "out")]) == 1
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "out").exists()

    # The payload is real: the unrestricted loader, which --trust-checkpoint opts into, runs it.
    jvit.convert.load_checkpoint_file(path, trust=True)
    assert marker.read_text() == "pwned"


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        jvit.convert.load_checkpoint_file(tmp_path / "nope.pth")


# ---------------------------------------------------------------------------------------------
# Wrapper handling and strictness (on the reduced SoT fixture)
# ---------------------------------------------------------------------------------------------

SOT_REDUCED = dict(embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.5, head=HeadConfig("mgcrp", (3, 5), dropout=0.5))


@pytest.fixture(scope="module")
def reduced():
    meta, io, ckpt = load_case("sot", "reduced_densenet_mgcrp")
    raw = jvit.convert.load_checkpoint_file(ckpt)
    return io, raw


def _save(tmp_path, obj, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_bare_and_module_prefixed_state_dicts(tmp_path, reduced):
    io, raw = reduced
    model = jvit.create_model("sot_tiny", num_classes=10, **SOT_REDUCED)
    x = nchw_to_nhwc(io["images"])
    ema = raw["state_dict_ema"]
    for obj in (ema, {"state_dict_ema": {f"module.{k}": v for k, v in ema.items()}}):
        variables = jvit.convert.load_torch_checkpoint(_save(tmp_path, obj), "sot_tiny", **SOT_REDUCED)
        assert_parity("logits", model.apply(variables, x), io["logits"])


def test_num_classes_is_inferred_from_the_head(tmp_path, reduced):
    _, raw = reduced
    variables, report = jvit.convert.convert_checkpoint(_save(tmp_path, raw), "sot_tiny", **SOT_REDUCED)
    assert report.num_classes == 10 and report.weights_key == "state_dict_ema"
    assert variables["params"]["classifier"]["cls_fc"]["kernel"].shape == (48, 10)
    assert sum(1 for _, why in report.skipped if "BatchNorm step counter" in why) == 3


def test_absent_weights_key_lists_the_entries(tmp_path, reduced):
    _, raw = reduced
    with pytest.raises(CheckpointFormatError, match=r"no entry 'model_ema'.*state_dict_ema"):
        jvit.convert.load_torch_checkpoint(_save(tmp_path, raw), "sot_tiny", weights_key="model_ema", **SOT_REDUCED)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), r"1 missing.*blocks_1/mlp/fc2/bias"),
        (
            lambda sd: sd.__setitem__("blocks.9.attn.qkv.weight", torch.zeros(3, 3)),
            r"1 unexpected.*blocks\.9\.attn\.qkv\.weight",
        ),
        (lambda sd: sd.__setitem__("norm.weight", torch.zeros(47)), r"1 shape mismatch.*norm\.weight \(47,\)"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_strictness_names_every_offending_key(tmp_path, reduced, edit, message):
    _, raw = reduced
    sd = dict(raw["state_dict_ema"])
    edit(sd)
    with pytest.raises(ConversionError, match=f"(?s){message}"):
        jvit.convert.load_torch_checkpoint(_save(tmp_path, sd), "sot_tiny", **SOT_REDUCED)


def test_wrong_num_classes_is_a_shape_error(tmp_path, reduced):
    _, raw = reduced
    with pytest.raises(ConversionError, match="(?s)classifier.cls_fc.weight.*expects"):
        jvit.convert.load_torch_checkpoint(_save(tmp_path, raw), "sot_tiny", num_classes=1000, **SOT_REDUCED)


# ---------------------------------------------------------------------------------------------
# Released layouts of every official variant
# ---------------------------------------------------------------------------------------------

# (C, depth, mlp hidden, head dims): spec §1.1 / §8.
SOT_VARIANTS = {
    "sot_tiny": (240, 12, 600, (6, 14)),
    "sot_small": (384, 14, 1344, (6, 24)),
    "sot_base": (528, 24, 1584, (6, 38)),
    "sovit_7": (256, 7, 512, (48, 24)),
    "sovit_10": (256, 10, 512, (48, 24)),
    "sovit_14": (384, 14, 1152, (64, 48)),
    "sovit_19": (448, 19, 1344, (96, 48)),
}


def released_state_dict(name: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a released SoT/So-ViT state dict, written from the spec's listing (§8, App. A)."""
    c, depth, hidden, (a, b) = SOT_VARIANTS[name]
    keys: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, c), "pos_embed": (1, 197, c)}
    t = "visual_tokens.tokens."
    keys[t + "stem.0.weight"], keys[t + "stem.0.bias"] = (64, 3, 3, 3), (64,)

    def bn(prefix, width):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{leaf}"] = (width,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    if name.startswith("sot"):
        for s, c0 in ((0, 64), (2, 128), (4, 128)):
            for layer in range(1, 7):
                keys[f"{t}stage.{s}.denselayer{layer}.conv1.weight"] = (32, c0 + 16 * (layer - 1), 1, 1)
                keys[f"{t}stage.{s}.denselayer{layer}.conv2.weight"] = (16, 32, 3, 3)
        for s, width in ((1, 160), (3, 224), (5, 224)):
            bn(f"{t}stage.{s}.norm", width)
            keys[f"{t}stage.{s}.conv.weight"] = (128, width, 1, 1)
        keys[t + "transition.weight"], keys[t + "transition.bias"] = (c, 128, 1, 1), (c,)
        keys["classifier.representation.wr.weight"] = (2 * a * b, c)
        keys["classifier.representation.norm.weight"] = (b,)
        visual = a * b * b
    else:
        for k in range(3):
            cin = 64 if k == 0 else 256
            p = f"{t}stage.{k}."
            keys[p + "conv1.weight"], keys[p + "conv2.weight"] = (64, cin, 1, 1), (64, 64, 3, 3)
            keys[p + "conv3.weight"], keys[p + "downsample.0.weight"] = (256, 64, 1, 1), (256, cin, 1, 1)
            for n, width in (("bn1", 64), ("bn2", 64), ("bn3", 256), ("downsample.1", 256)):
                bn(p + n, width)
        keys[t + "transition.weight"], keys[t + "transition.bias"] = (c, 256, 1, 1), (c,)
        for i, d in enumerate((a, b)):
            keys[f"classifier.representation.conv_dr_block.{i}.0.weight"] = (d, c, 1, 1)
            bn(f"classifier.representation.conv_dr_block.{i}.1", d)
        keys["classifier.normalization.weight"] = (a,)
        visual = a * b
    for i in range(depth):
        p = f"blocks.{i}."
        keys.update(
            {
                p + "norm1.weight": (c,),
                p + "norm1.bias": (c,),
                p + "attn.qkv.weight": (3 * c, c),
                p + "attn.proj.weight": (c, c),
                p + "attn.proj.bias": (c,),
                p + "norm2.weight": (c,),
                p + "norm2.bias": (c,),
                p + "mlp.fc1.weight": (hidden, c),
                p + "mlp.fc1.bias": (hidden,),
                p + "mlp.fc2.weight": (c, hidden),
                p + "mlp.fc2.bias": (c,),
            }
        )
    keys.update(
        {
            "classifier.visual_fc.weight": (num_classes, visual),
            "classifier.visual_fc.bias": (num_classes,),
            "classifier.cls_fc.weight": (num_classes, c),
            "classifier.cls_fc.bias": (num_classes,),
            "norm.weight": (c,),
            "norm.bias": (c,),
        }
    )
    expected = (68 if name.startswith("sot") else 97) + 11 * depth  # the spec's entry counts
    assert len(keys) == expected, (len(keys), expected)
    return keys


@pytest.mark.parametrize("name", sorted(SOT_VARIANTS))
def test_every_official_variant_converts_from_the_released_layout(name):
    keys = released_state_dict(name)
    sd = {k: np.zeros(s, np.int64 if k.endswith("num_batches_tracked") else np.float32) for k, s in keys.items()}
    model = jvit.create_model(name)
    variables, report = jvit.convert.convert_state_dict(sd, model, jvit.convert.rules_for(name), model_name=name)
    assert report.converted + len(report.skipped) == len(keys)
    assert {k for k, _ in report.skipped} == {k for k in keys if k.endswith("num_batches_tracked")}
    floats = sum(int(np.prod(s)) for k, s in keys.items() if not k.endswith("num_batches_tracked"))
    assert sum(report.per_collection.values()) == floats


def test_cli_converts_a_released_file_and_loads_back(tmp_path):
    """A So-ViT-7 file as released (EMA + plain weights, AdamW state, training args Namespace, AMP
    scaler) goes through the CLI into an orbax directory that reproduces the direct conversion."""
    rng = np.random.default_rng(0)
    keys = released_state_dict("sovit_7")

    def weights():
        return {
            k: torch.zeros(s, dtype=torch.int64)
            if k.endswith("num_batches_tracked")
            else torch.from_numpy((rng.standard_normal(s) * 0.05 + (k.endswith("running_var"))).astype(np.float32))
            for k, s in keys.items()
        }

    sd, ema = weights(), weights()
    trainable = [k for k in sd if not k.endswith(("running_mean", "running_var", "num_batches_tracked", "pos_embed"))]
    release = {
        "epoch": 309,
        "arch": "So_vit_7",
        "version": 2,
        "state_dict": sd,
        "state_dict_ema": ema,
        "metric": 76.8,
        "optimizer": {
            "state": {
                i: {
                    "step": torch.tensor(5.0),
                    "exp_avg": torch.zeros_like(sd[k]),
                    "exp_avg_sq": torch.zeros_like(sd[k]),
                }
                for i, k in enumerate(trainable)
            },
            "param_groups": [
                {
                    "lr": 1e-5,
                    "betas": (0.9, 0.999),
                    "eps": 1e-8,
                    "weight_decay": 0.03,
                    "amsgrad": False,
                    "params": list(range(len(trainable))),
                }
            ],
        },
        "args": argparse.Namespace(model="So_vit_7", lr=1e-3, batch_size=64, model_ema=True, smoothing=0.1),
        "amp_scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 17,
        },
    }
    path = _save(tmp_path, release, "So-ViT-7.pth.tar")
    out = tmp_path / "converted"
    assert convert_cli([str(path), "--model", "sovit_7", "--output", str(out)]) == 0
    variables, meta = load_variables(out)
    assert meta["model"] == "sovit_7" and meta["num_classes"] == 1000 and meta["weights_key"] == "state_dict_ema"
    np.testing.assert_array_equal(
        variables["params"]["classifier"]["cls_fc"]["kernel"], ema["classifier.cls_fc.weight"].numpy().T
    )
    np.testing.assert_array_equal(variables["frozen"]["pos_embed"], ema["pos_embed"].numpy())
    np.testing.assert_array_equal(
        variables["batch_stats"]["visual_tokens"]["stage_0"]["downsample_bn"]["var"],
        ema["visual_tokens.tokens.stage.0.downsample.1.running_var"].numpy(),
    )
    # The non-EMA weights on request; an existing output directory is refused.
    assert (
        convert_cli(
            [str(path), "--model", "sovit_7", "--output", str(tmp_path / "plain"), "--weights-key", "state_dict"]
        )
        == 0
    )
    plain, _ = load_variables(tmp_path / "plain")
    np.testing.assert_array_equal(plain["params"]["norm"]["scale"], sd["norm.weight"].numpy())
    assert convert_cli([str(path), "--model", "sovit_7", "--output", str(out)]) == 2
    assert os.path.isdir(out / "variables")
