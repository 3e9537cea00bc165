"""UNet2DConditionModel: numerical parity with diffusers' PyTorch model on tiny SD1-, SD2- and SDXL-style configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from sdjax import weights
from sdjax.models.config import ConfigTypeError, UnsupportedConfigError
from sdjax.models.unet import FeedForward, UNet2DConditionConfig, UNet2DConditionModel, get_timestep_embedding
from tests.published import published_config
from tests.reference import perturb_

jax.config.update("jax_default_matmul_precision", "highest")

TINY_SD1 = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "attention_head_dim": 2,  # diffusers' SD naming: two heads of 16 channels
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
}

TINY_SD2 = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "attention_head_dim": [2, 4, 4],
    "cross_attention_dim": 24,
    "norm_num_groups": 4,
    "use_linear_projection": True,
    "upcast_attention": True,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "center_input_sample": True,
    # Not in SD 2.x, covered here in the same compilation: asymmetric downsample padding, deeper transformers.
    "downsample_padding": 0,
    "transformer_layers_per_block": [1, 2, 1],
}

SD15 = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# SDXL's shape in miniature: no attention in the first block, per-block heads and transformer depths (SDXL base:
# [1, 2, 10]), linear projections, "text_time" added conditioning from a pooled embedding and 6 size/crop ids.
TIME_DIM, POOLED = 8, 12
TINY_XL = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 2,
    "attention_head_dim": [1, 2, 4],
    "cross_attention_dim": 24,
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "transformer_layers_per_block": [1, 1, 2],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_DIM,
    "projection_class_embeddings_input_dim": POOLED + 6 * TIME_DIM,
}
# The refiner's shape: attention in the middle blocks only, one int depth, 5 ids (size, crop, aesthetic score);
# here also conv projections, to cover them with text_time.
TINY_XL_REFINER = {
    **TINY_XL,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": False,
    "transformer_layers_per_block": 2,
    "projection_class_embeddings_input_dim": POOLED + 5 * TIME_DIM,
}
# diffusers' asymmetric form: a depth per layer, and the up blocks' depths given separately (up-block order, one
# more layer each). The mid block takes the last down block's first depth (2).
TINY_XL_NESTED = {
    **TINY_XL,
    "transformer_layers_per_block": [[1, 1], [1, 2], [2, 1]],
    "reverse_transformer_layers_per_block": [[2, 1, 1], [1, 3, 1], [1, 1, 1]],
}


def _torch_unet_folder(config: dict, folder, seed: int = 0) -> TorchUNet:
    torch.manual_seed(seed)
    model = perturb_(TorchUNet(**{k: v for k, v in config.items() if not k.startswith("_")}), seed)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _inputs(config: dict, batch: int = 2, size: int = 16, seq: int = 7, seed: int = 1):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, size, size, config["in_channels"]), dtype=np.float32)
    context = rng.standard_normal((batch, seq, config["cross_attention_dim"]), dtype=np.float32)
    timesteps = np.array([999, 13][:batch], dtype=np.int64)
    return sample, timesteps, context


def _torch_forward(model: TorchUNet, sample, timesteps, context) -> np.ndarray:
    with torch.no_grad():
        out = model(
            torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(timesteps), torch.from_numpy(context)
        ).sample
    return out.permute(0, 2, 3, 1).numpy()


def _added_conditions(config: dict, batch: int = 2, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(text_embeds (B, pooled), time_ids (B, N)) as SDXL pipelines build them: sizes and crops in pixels."""
    num_ids = (config["projection_class_embeddings_input_dim"] - POOLED) // config["addition_time_embed_dim"]
    # original size, crop top-left, then target size (base, 6 ids) or aesthetic score (refiner, 5 ids)
    rows = [([1024, 1024, 0, 0], [1024, 1024], [6.0]), ([512, 768, 16, 48], [640, 896], [2.5])]
    time_ids = np.array([size_crop + (target if num_ids == 6 else score) for size_crop, target, score in rows])
    text_embeds = np.random.default_rng(seed).standard_normal((batch, POOLED), dtype=np.float32)
    return text_embeds, time_ids[:batch].astype(np.float32)


def _torch_forward_xl(model: TorchUNet, sample, timesteps, context, text_embeds, time_ids) -> np.ndarray:
    added = {"text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)}
    with torch.no_grad():
        out = model(
            torch.from_numpy(sample).permute(0, 3, 1, 2),
            torch.from_numpy(timesteps),
            torch.from_numpy(context),
            added_cond_kwargs=added,
        ).sample
    return out.permute(0, 2, 3, 1).numpy()


def _relative_error(ours, reference) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float32) - reference)) / np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet_sd1")
    model = _torch_unet_folder(TINY_SD1, folder)
    return folder, model


@pytest.mark.parametrize("config", [TINY_SD1, TINY_SD2], ids=["sd1_conv_proj", "sd2_linear_proj_upcast"])
def test_matches_diffusers(config, tmp_path):
    reference_model = _torch_unet_folder(config, tmp_path)
    unet, params = weights.load_component(tmp_path)
    sample, timesteps, context = _inputs(config)
    reference = _torch_forward(reference_model, sample, timesteps, context)
    ours = jax.jit(unet.apply)({"params": params}, sample, timesteps, context)
    error = _relative_error(ours, reference)
    print(f"UNet parity {config['down_block_types']}: max rel error {error:.2e}")
    assert ours.shape == reference.shape
    assert error <= 1e-4


def test_odd_latent_size_upsamples_to_skip_size_like_diffusers(sd1_folder):
    folder, reference_model = sd1_folder
    unet, params = weights.load_component(folder)
    sample, timesteps, context = _inputs(TINY_SD1, size=9)  # 9 -> 5 on the way down: diffusers' upsample_size path
    reference = _torch_forward(reference_model, sample, timesteps, context)
    ours = jax.jit(unet.apply)({"params": params}, sample, timesteps, context)
    assert ours.shape == reference.shape == (2, 9, 9, 4)
    assert _relative_error(ours, reference) <= 1e-4


def test_scalar_float_timestep_matches_diffusers(sd1_folder):
    folder, reference_model = sd1_folder
    unet, params = weights.load_component(folder)
    sample, _, context = _inputs(TINY_SD1)
    with torch.no_grad():
        reference = reference_model(
            torch.from_numpy(sample).permute(0, 3, 1, 2), 500.5, torch.from_numpy(context)
        ).sample.permute(0, 2, 3, 1)
    ours = jax.jit(unet.apply)({"params": params}, sample, 500.5, context)
    assert _relative_error(ours, reference.numpy()) <= 1e-4


def test_feed_forward_uses_exact_gelu_like_diffusers():
    from diffusers.models.attention import FeedForward as TorchFeedForward

    torch.manual_seed(0)
    reference_ff = TorchFeedForward(8, activation_fn="geglu")
    x = 3 * np.random.default_rng(0).standard_normal((2, 5, 8), dtype=np.float32)  # where tanh-GELU differs
    ff = FeedForward()
    shapes = jax.eval_shape(ff.init, jax.random.key(0), x)["params"]
    params = weights.torch_to_flax({k: v.numpy() for k, v in reference_ff.state_dict().items()}, shapes)
    with torch.no_grad():
        reference = reference_ff(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ff.apply({"params": params}, x), reference, rtol=1e-5, atol=1e-5)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding as torch_embedding

    t = np.array([0, 1, 250, 999], dtype=np.int64)
    for flip, shift, dim in ((True, 0, 320), (False, 1, 33)):
        reference = torch_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        ours = get_timestep_embedding(jnp.asarray(t), dim, flip, shift)
        np.testing.assert_allclose(np.asarray(ours), reference.numpy(), atol=2e-4)


SD21 = {
    **SD15,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
    "sample_size": 96,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "class_embed_type": None,
    "resnet_time_scale_shift": "default",
}


@pytest.mark.parametrize("config, count", [(SD15, 859_520_964), (SD21, 865_910_724)], ids=["sd15", "sd21"])
def test_parameter_count_matches_stable_diffusion(config, count):
    unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict(config))
    shapes = weights.param_shapes(unet)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == count


def test_parameter_names_and_shapes_match_diffusers_state_dict(sd1_folder):
    _, reference_model = sd1_folder
    unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict(TINY_SD1))
    exported = weights.flax_to_torch(jax.tree.map(lambda x: np.zeros(x.shape), weights.param_shapes(unet)))
    expected = {k: tuple(v.shape) for k, v in reference_model.state_dict().items()}
    assert {k: v.shape for k, v in exported.items()} == expected


@pytest.mark.parametrize(
    "config",
    [TINY_XL, TINY_XL_REFINER, TINY_XL_NESTED],
    ids=["sdxl_per_block_depths", "refiner_int_depth_conv_proj", "nested_reverse_depths"],
)
def test_sdxl_text_time_matches_diffusers(config, tmp_path):
    reference_model = _torch_unet_folder(config, tmp_path)
    unet, params = weights.load_component(tmp_path)
    sample, timesteps, context = _inputs(config)
    text_embeds, time_ids = _added_conditions(config)
    reference = _torch_forward_xl(reference_model, sample, timesteps, context, text_embeds, time_ids)
    ours = jax.jit(unet.apply)(
        {"params": params}, sample, timesteps, context, text_embeds=text_embeds, time_ids=time_ids
    )
    error = _relative_error(ours, reference)
    print(f"SDXL UNet parity {config['transformer_layers_per_block']}: max rel error {error:.2e}")
    assert ours.shape == reference.shape
    assert error <= 1e-4


def test_nested_depths_build_diffusers_transformer_stacks(tmp_path):
    """Per-layer depths down, the mid block from the last down block's first layer, up blocks from the reverse
    list: the same parameter names and shapes as diffusers' state dict."""
    reference_model = TorchUNet(**TINY_XL_NESTED)
    unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict(TINY_XL_NESTED))
    exported = weights.flax_to_torch(jax.tree.map(lambda x: np.zeros(x.shape), weights.param_shapes(unet)))
    assert {k: v.shape for k, v in exported.items()} == {
        k: tuple(v.shape) for k, v in reference_model.state_dict().items()
    }
    assert "up_blocks.1.attentions.1.transformer_blocks.2.attn1.to_q.weight" in exported
    assert "mid_block.attentions.0.transformer_blocks.1.attn1.to_q.weight" in exported
    assert "mid_block.attentions.0.transformer_blocks.2.attn1.to_q.weight" not in exported


def test_text_time_conditioning_changes_the_prediction(tmp_path):
    """Different size/crop ids for the same noise, timestep and text give a different prediction."""
    config = {**TINY_XL, "block_out_channels": [16, 16, 16], "transformer_layers_per_block": 1}
    unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict(config))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: 0.2 * rng.standard_normal(x.shape, np.float32), weights.param_shapes(unet))
    sample, timesteps, context = _inputs(config, batch=1)
    text_embeds, time_ids = _added_conditions(config, batch=1)
    apply = jax.jit(unet.apply)
    a = apply({"params": params}, sample, timesteps, context, text_embeds=text_embeds, time_ids=time_ids)
    b = apply({"params": params}, sample, timesteps, context, text_embeds=text_embeds, time_ids=time_ids / 2)
    assert _relative_error(a, np.asarray(b)) > 1e-3


@pytest.mark.parametrize(
    "config, kwargs, message",
    [
        (TINY_XL, {}, r"needs text_embeds \(batch=2, P\) and time_ids \(batch=2, N\) with P \+ N \* 8 = 60.*neither"),
        (TINY_XL, {"text_embeds": np.zeros((2, POOLED))}, "got only text_embeds"),
        (TINY_XL, {"text_embeds": np.zeros((2, POOLED)), "time_ids": np.zeros((2, 5))}, r"time_ids \(2, 5\)"),
        (TINY_XL, {"text_embeds": np.zeros((1, POOLED)), "time_ids": np.zeros((1, 6))}, r"text_embeds \(1, 12\)"),
        (TINY_SD1, {"text_embeds": np.zeros((2, POOLED))}, "only addition_embed_type='text_time'"),
    ],
    ids=["missing_both", "missing_time_ids", "wrong_width", "wrong_batch", "given_to_sd_unet"],
)
def test_added_conditions_are_checked_with_one_clear_error(config, kwargs, message):
    unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict(config))
    sample, timesteps, context = _inputs(config)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(unet.init, jax.random.key(0), sample, timesteps, context, **kwargs)


def test_nested_depths_without_reverse_list_are_rejected_as_in_diffusers():
    config = {**TINY_XL_NESTED, "reverse_transformer_layers_per_block": None}
    with pytest.raises(ValueError, match="give reverse_transformer_layers_per_block too"):
        UNet2DConditionConfig.from_dict(config)


def test_per_layer_depths_shorter_than_the_block_are_rejected():
    config = {**TINY_XL_NESTED, "reverse_transformer_layers_per_block": [[2, 1], [1, 3, 1], [1, 1, 1]]}
    with pytest.raises(
        ValueError, match=r"reverse_transformer_layers_per_block\[0\]=\[2, 1\] has 2 depths .* 3 layers"
    ):
        UNet2DConditionConfig.from_dict(config)


def test_nested_depth_of_the_wrong_type_names_the_field():
    with pytest.raises(ConfigTypeError, match="transformer_layers_per_block"):
        UNet2DConditionConfig.from_dict({**TINY_XL_NESTED, "transformer_layers_per_block": [[1, "2"], 1, 1]})


def test_text_time_needs_its_dimensions():
    config = {k: v for k, v in TINY_XL.items() if k != "addition_time_embed_dim"}
    with pytest.raises(ValueError, match="addition_time_embed_dim and projection_class_embeddings_input_dim"):
        UNet2DConditionConfig.from_dict(config)


def test_other_addition_embed_types_are_rejected_naming_the_field():
    with pytest.raises(UnsupportedConfigError, match="addition_embed_type='text_image'"):
        UNet2DConditionConfig.from_dict({**TINY_XL, "addition_embed_type": "text_image"})


def test_sdxl_base_parameter_count_is_diffusers():
    unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict(published_config("sdxl_base", "unet")))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(weights.param_shapes(unet))) == 2_567_463_684


def test_nested_config_round_trips_through_dict():
    config = UNet2DConditionConfig.from_dict(TINY_XL_NESTED)
    assert UNet2DConditionConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["transformer_layers_per_block"] == [[1, 1], [1, 2], [2, 1]]


def test_unknown_block_type_is_rejected():
    config = {**TINY_SD1, "down_block_types": ["AttnDownBlock2D", "DownBlock2D"]}
    with pytest.raises(UnsupportedConfigError, match="AttnDownBlock2D"):
        UNet2DConditionConfig.from_dict(config)


def test_num_attention_heads_overrides_attention_head_dim():
    base = UNet2DConditionConfig.from_dict(TINY_SD1)
    explicit = UNet2DConditionConfig.from_dict({**TINY_SD1, "attention_head_dim": 16, "num_attention_heads": 2})
    assert explicit.heads() == base.heads() == (2, 2)


def test_config_round_trips_through_dict():
    config = UNet2DConditionConfig.from_dict(TINY_SD2)
    assert UNet2DConditionConfig.from_dict(config.to_dict()) == config


def test_save_component_reloads_in_diffusers(sd1_folder, tmp_path):
    folder, reference_model = sd1_folder
    unet, params = weights.load_component(folder)
    weights.save_component(unet, params, tmp_path)
    reloaded = TorchUNet.from_pretrained(tmp_path).eval()
    sample, timesteps, context = _inputs(TINY_SD1)
    expected = _torch_forward(reference_model, sample, timesteps, context)
    assert _relative_error(_torch_forward(reloaded, sample, timesteps, context), expected) == 0.0


def test_bfloat16_compute_stays_close_to_float32(sd1_folder):
    folder, reference_model = sd1_folder
    unet, params = weights.load_component(folder, dtype=jnp.bfloat16)
    sample, timesteps, context = _inputs(TINY_SD1)
    reference = _torch_forward(reference_model, sample, timesteps, context)  # float32, equal to ours to 1e-6
    out = jax.jit(unet.apply)({"params": params}, sample, timesteps, context)
    assert out.dtype == jnp.bfloat16
    error = _relative_error(out, reference)
    print(f"UNet bfloat16 vs float32: max rel error {error:.2e}")
    assert error <= 5e-2


_TEXT_TIME = {k: TINY_XL[k] for k in ("addition_embed_type", "addition_time_embed_dim")}


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {
            **_TEXT_TIME,
            "projection_class_embeddings_input_dim": POOLED + 6 * TIME_DIM,
            "transformer_layers_per_block": [2],
        },
    ],
    ids=["sd", "sdxl_text_time"],
)
def test_remat_gives_same_gradients(extra):
    # One resolution level keeps the two backward-pass compilations short.
    config = {
        **TINY_SD1,
        "down_block_types": ["CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D"],
        "block_out_channels": [16],
        "layers_per_block": 1,
        **extra,
    }
    unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict(config))
    sample, timesteps, context = _inputs(config, batch=1, size=8)
    added = dict(zip(("text_embeds", "time_ids"), _added_conditions(config, batch=1), strict=True)) if extra else {}
    rng = np.random.default_rng(0)
    # Random values for every parameter without compiling `init`.
    params = jax.tree.map(lambda x: 0.2 * rng.standard_normal(x.shape, np.float32), weights.param_shapes(unet))

    def grads(module):
        loss = lambda p: jnp.mean(module.apply({"params": p}, sample, timesteps, context, **added) ** 2)
        return jax.jit(jax.grad(loss))(params)

    plain, remat = grads(unet), grads(unet.clone(remat=True))
    assert jax.tree.structure(plain) == jax.tree.structure(remat)
    assert ("add_embedding" in plain) == bool(extra)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "sample_shape, timesteps_shape, context_shape, message",
    [
        ((2, 16, 16, 3), (2,), (2, 7, 32), "sample must be NHWC"),
        ((2, 16, 16, 4), (3,), (2, 7, 32), "timesteps"),
        ((2, 16, 16, 4), (2,), (2, 7, 16), "encoder_hidden_states"),
    ],
    ids=["channels", "timesteps", "context_dim"],
)
def test_bad_input_shapes_raise_value_error(sample_shape, timesteps_shape, context_shape, message):
    unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict(TINY_SD1))
    args = (jnp.zeros(sample_shape), jnp.zeros(timesteps_shape), jnp.zeros(context_shape))
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(unet.init, jax.random.key(0), *args)
