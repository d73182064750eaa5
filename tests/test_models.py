"""The registry contract every variant of every family meets, and activation rematerialisation.

* Every name of ``jvit.list_models()`` builds, has exactly the original's parameter count, and its
  forward traces at each official resolution to float32 logits ``[B, num_classes]`` (``jax.eval_shape``:
  nothing is compiled or computed).
* One small configuration per architecture runs for real and follows the protocol of
  :mod:`jvit.models`: ``model(x) == forward_head(forward_features(x))``, the ``tokens`` intermediate is
  what ``forward_features`` returns, ``features`` is ``[B, C]``, ``token_grid`` matches the grid tokens.
* ``remat='block'`` and ``'dots'`` change neither parameters nor loss and gradients, and keep fewer
  activations for the backward pass.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jvit
from jvit.models import layers
from jvit.models.sot import HeadConfig
from jvit.utils import abstract_variables, count_params, init_variables

# ---------------------------------------------------------------------------------------------
# Parameter counts: the original's trainable parameters (torch ``requires_grad``), compared with
# jvit's ``params`` collection. Frozen tables (SoT's sinusoid ``pos_embed``, jvit's ``frozen``
# collection; STViT's 81-element constant fold/unfold kernels, which jvit does not store) and
# buffers (BatchNorm running statistics, jvit's ``batch_stats``) are left out on both sides.
# An int is the count at the default resolution (and every other official one: the count does not
# depend on it); a dict gives the count at each official resolution.
# ---------------------------------------------------------------------------------------------

PARAMS: dict[str, int | dict[int, int]] = {
    # timm 0.4.12's deit_*_patch16_224 / swin_*_patch4_window7_224, sum(p.numel()) (the DeiT / Swin
    # papers' 5M/22M/86M/28M/50M/88M; every timm parameter is trainable).
    "deit_tiny": 5_717_416,
    "deit_small": 22_050_664,
    "deit_base": 86_567_656,
    "deit_tiny_distilled": 5_910_800,
    "deit_small_distilled": 22_436_432,
    "deit_base_distilled": 87_338_192,
    "swin_tiny": 28_288_354,
    "swin_small": 49_606_258,
    "swin_base": 87_768_224,
    # jvit's SoT-head variants (no original exists): the timm backbone less its linear head, plus SoT's
    # head of sot.md section 1.1 (MGCrP wr + svPN, visual_fc, and cls_fc = the DeiT head). SoT README's
    # "+ours" (7.0 / 26.9 / 94.9 / 31.6 / 95.9 M) differ: its models also replaced the token embedding.
    "deit_tiny_sot": 6_926_686,
    "deit_small_sot": 25_618_280,
    "deit_base_sot": 95_582_902,
    "swin_tiny_sot": 31_197_562,
    "swin_base_sot": 95_875_206,
    # shared/specs/sot.md section 1.2, column "trainable" (total less the frozen pos_embed).
    "sot_tiny": 7_983_550,
    "sot_small": 27_010_856,
    "sot_base": 76_774_966,
    "sovit_7": 5_529_232,
    "sovit_10": 7_108_240,
    "sovit_14": 24_643_056,
    "sovit_19": 43_799_440,
    # shared/specs/stvit.md section 1.1, "params measured total / trainable": trainable (same at 384).
    "stvit_small": 25_495_624,
    "stvit_base": 51_691_288,
    "stvit_large": 94_971_096,
    # shared/specs/spvit.md section 1, "params measured (224 / 384)" (only pos_embed grows at 384).
    "spvit_s": {224: 26_234_468, 384: 26_380_388},
    "spvit_m": {224: 55_952_992, 384: 56_147_552},
    "spvit_l": {224: 150_205_520, 384: 150_497_360},
    # shared/specs/hvt.md section 1, "params measured (1000 cls)" (HVT has no buffers or frozen tensors).
    "hvt_ti_1": 5_735_656,
    "hvt_s_0": 22_049_896,
    "hvt_s_1": 22_087_144,
    "hvt_s_2": 22_105_576,
    "hvt_s_3": 22_114_408,
    "hvt_s_4": 22_118_632,
    "scale_hvt_ti_4": 22_118_632,
}

# ---------------------------------------------------------------------------------------------
# Small configurations: one per architecture (module attributes overriding the variant's), small
# enough to run for real on a CPU and still valid for the family (window / grid / pooling
# constraints), with ``prefix`` = the number of non-grid tokens forward_features puts first.
# ---------------------------------------------------------------------------------------------

_DEIT = dict(img_size=32, embed_dim=48, depth=2, num_heads=2)
_SWIN = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)  # 8x8 (shifted), 4x4
_MGCRP = HeadConfig("mgcrp", (2, 4))
SMALL: dict[str, tuple[dict, int]] = {
    "deit_tiny": (_DEIT, 1),
    "deit_tiny_distilled": (_DEIT, 2),
    "deit_tiny_sot": ({**_DEIT, "second_order": _MGCRP}, 1),
    "swin_tiny": (_SWIN, 0),
    "swin_tiny_sot": ({**_SWIN, "second_order": _MGCRP}, 0),
    # SoT's DenseNet / So-ViT's ResNet token embeddings need 112 or 224 px.
    "sot_tiny": (dict(img_size=112, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.5, head=_MGCRP), 1),
    "sovit_7": (
        dict(img_size=112, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.0, head=HeadConfig("cross", (8, 4))),
        1,
    ),
    # Two stages: super tokens (8x8 grid in 4x4 cells) without layer scale, then plain attention with it.
    "stvit_small": (
        dict(
            img_size=32,
            embed_dim=(8, 16),
            depths=(1, 1),
            num_heads=(1, 2),
            n_iter=(1, 1),
            stoken_size=(4, 1),
            layerscale=(False, True),
            projection=8,
        ),
        0,
    ),
    # Two SP-SA blocks on the patch tokens, the class token inserted before block 2.
    "spvit_s": (
        dict(img_size=64, embed_dim=32, depth=3, num_heads=2, stem_width=8, spsa_blocks=(0, 1), cls_insert_block=2),
        1,
    ),
    # Pooling after block 0: 64 -> 31 tokens (no grid).
    "hvt_ti_1": (dict(img_size=32, patch_size=4, head_dim=16, num_blocks=2), 0),
}


# The remat checks run one small configuration per model class: the distilled and SoT-head
# variants run DeiT's and Swin's blocks, So-ViT runs SoT's.
REMAT_CASES = ["deit_tiny", "hvt_ti_1", "sot_tiny", "spvit_s", "stvit_small", "swin_tiny"]


# Where ``features`` is sown elsewhere than at the top: the visual-only SoT head (no class token)
# feeds its one linear classifier, visual_fc, the second-order vector it computes itself.
FEATURES_AT = {"swin_tiny_sot": "classifier/features_visual"}


def official_sizes(name: str) -> list[int]:
    return sorted({cfg.img_size for cfg in jvit.get_model_entry(name).pretrained_cfgs})


def test_tables_cover_the_registry():
    """A new variant needs its parameter count here, a new family a small configuration."""
    assert set(PARAMS) == set(jvit.list_models())
    families = {jvit.get_model_entry(n).family for n in jvit.list_models()}
    assert families == {jvit.get_model_entry(n).family for n in SMALL}
    modules = {type(jvit.create_model(n)) for n in jvit.list_models()}
    assert modules == {type(jvit.create_model(n)) for n in REMAT_CASES}
    for name, count in PARAMS.items():
        assert isinstance(count, int) or set(count) == set(official_sizes(name)), name


@pytest.mark.parametrize("name", jvit.list_models())
def test_variant_contract(name):
    """Builds with the original's parameter count (at each official resolution where it depends on
    it), and the forward traces to float32 ``[B, classes]`` at the default one (nothing compiled)."""
    default = jvit.get_pretrained_cfg(name).img_size
    counts = PARAMS[name] if isinstance(PARAMS[name], dict) else {default: PARAMS[name]}
    for img_size, count in counts.items():
        model = jvit.create_model(name, num_classes=1000, img_size=img_size)
        x = jax.ShapeDtypeStruct((2, img_size, img_size, 3), jnp.float32)

        def init_and_apply(rng, x):
            variables = model.init(rng, x, train=False)
            return variables["params"], model.apply(variables, x, train=False) if img_size == default else None

        params, logits = jax.eval_shape(init_and_apply, jax.random.key(0), x)
        assert count_params(params) == count, img_size
        if img_size == default:
            assert (logits.shape, logits.dtype) == ((2, 1000), jnp.float32)


@pytest.mark.parametrize("name", jvit.list_models())
def test_variant_attributes(name):
    """The module attributes every model takes (jvit.models)."""
    model = jvit.create_model(name)
    for attr in ("num_classes", "img_size", "dtype", "drop_path_rate", "remat"):
        assert hasattr(model, attr), f"{name} has no attribute {attr!r}"


def small_model(name: str, **kw):
    overrides, _ = SMALL[name]
    return jvit.create_model(name, num_classes=7, **{**overrides, **kw})


def small_images(model, batch: int = 2) -> jax.Array:
    return jax.random.normal(jax.random.key(1), (batch, model.img_size, model.img_size, 3))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_protocol(name):
    """``model(x) == forward_head(forward_features(x))`` and the intermediates it names."""
    model = small_model(name)
    _, prefix = SMALL[name]
    variables = init_variables(model, 0)
    x = small_images(model)
    logits, state = model.apply(variables, x, mutable=["intermediates"])
    tokens = model.apply(variables, x, method=lambda m, x: m.forward_features(x))
    split = model.apply(variables, x, method=lambda m, x: m.forward_head(m.forward_features(x)))
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    np.testing.assert_allclose(split, logits, rtol=1e-6, atol=1e-6)

    inter = {k: v[0] for k, v in traverse_util.flatten_dict(state["intermediates"], sep="/").items()}
    # Recording intermediates may take another code path (attention probabilities materialised): float32 ulps.
    np.testing.assert_allclose(inter["tokens"], tokens, rtol=1e-5, atol=1e-6)
    features = inter[FEATURES_AT.get(name, "features")]
    assert features.ndim == 2 and features.shape[0] == 2
    assert any(re.fullmatch(r"(layers_\d+/)?blocks_0/out", k) for k in inter), sorted(inter)
    assert tokens.ndim == 3 and tokens.shape[0] == 2
    if hasattr(model, "token_grid"):
        rows, cols = model.token_grid
        assert tokens.shape[1] == prefix + rows * cols
    else:
        assert tokens.shape[1] > prefix


def loss_and_grads(model, variables, x):
    """Train-mode loss (sum of squares of every output, auxiliary heads included) and its gradients,
    dropout / drop path from a fixed rng, BatchNorm on batch statistics."""
    mutable = [c for c in variables if c not in ("params", "frozen")]

    def loss(params):
        out = model.apply(
            {**variables, "params": params}, x, train=True, rngs={"dropout": jax.random.key(3)}, mutable=mutable
        )[0]
        return sum(jnp.sum(jnp.square(o.astype(jnp.float32))) for o in jax.tree.leaves(out))

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.mark.parametrize("name", REMAT_CASES)
def test_remat_changes_neither_parameters_nor_gradients(name):
    model = small_model(name, drop_path_rate=0.2)
    variables = init_variables(model, 0)
    x = small_images(model)
    loss, grads = loss_and_grads(model, variables, x)
    for policy in ("block", "dots"):
        remat = small_model(name, drop_path_rate=0.2, remat=policy)
        assert jax.tree.structure(abstract_variables(remat)) == jax.tree.structure(variables)
        loss_r, grads_r = loss_and_grads(remat, variables, x)
        np.testing.assert_allclose(loss_r, loss, rtol=1e-5)
        # Absolute slack relative to the largest gradient: some are float noise around an exact zero
        # (e.g. a conv bias followed by BatchNorm).
        atol = 1e-6 * max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
        for path, g in traverse_util.flatten_dict(grads, sep="/").items():
            g_r = traverse_util.flatten_dict(grads_r, sep="/")[path]
            np.testing.assert_allclose(g_r, g, rtol=1e-5, atol=atol, err_msg=path)


def test_trainer_config_selects_remat():
    """``model.remat`` is validated against the policies and reaches the trainer's model."""
    from jvit.errors import ConfigError
    from jvit.train import config as config_lib
    from jvit.train import state as state_lib

    c = config_lib.default_config()
    c.model.name = "deit_tiny"
    c.model.remat = "full"
    with pytest.raises(ConfigError, match=r"model.remat='full' is not one of: none, block, dots"):
        config_lib.validate(c)
    c.model.remat = "dots"
    config_lib.validate(c)
    assert state_lib.build_model(c, 10).remat == "dots"


def residual_bytes(model, variables, x) -> int:
    """Bytes the backward pass of the train-mode loss keeps from the forward (the VJP's residuals)."""
    mutable = [c for c in variables if c not in ("params", "frozen")]

    def loss(params, x):
        out = model.apply(
            {**variables, "params": params}, x, train=True, rngs={"dropout": jax.random.key(3)}, mutable=mutable
        )[0]
        return sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(out))

    residuals = jax.eval_shape(lambda p, x: jax.vjp(lambda p: loss(p, x), p)[1], variables["params"], x)
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(residuals))


def test_remat_keeps_fewer_activations():
    """DeiT's backward keeps less under 'dots' than 'none', and least under 'block' (jaxpr level:
    what the VJP stores, independent of the backend's scheduling)."""
    x = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
    variables = abstract_variables(small_model("deit_tiny", depth=4))
    kept = {
        policy: residual_bytes(small_model("deit_tiny", depth=4, remat=policy), variables, x)
        for policy in ("none", "dots", "block")
    }
    assert kept["block"] < kept["dots"] < kept["none"], kept


def test_remat_lowers_the_compiled_train_step_memory():
    """The compiled gradient of a small DeiT needs fewer temporary bytes under 'dots', fewest under
    'block', compiled as the trainer compiles (``barrier_compiler_options()``: without them XLA:CPU
    deletes remat's optimization barriers, CSE undoes the recomputation, and 'block' needs as much
    as 'none': 35.1 vs 34.5 MiB here; with them 11.2, 'dots' 17.4)."""
    x = jax.ShapeDtypeStruct((64, 64, 64, 3), jnp.float32)

    def temp_bytes(policy: str) -> int:
        model = small_model("deit_tiny", img_size=64, depth=6, remat=policy)
        variables = abstract_variables(model)
        grad = jax.grad(lambda p, x: jnp.sum(model.apply({"params": p}, x, train=True)))
        compiled = (
            jax.jit(grad, compiler_options=layers.barrier_compiler_options()).lower(variables["params"], x).compile()
        )
        return compiled.memory_analysis().temp_size_in_bytes

    temp = {policy: temp_bytes(policy) for policy in ("none", "dots", "block")}
    assert temp["block"] < temp["dots"] < temp["none"], temp
