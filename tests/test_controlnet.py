"""ControlNetModel: numerical parity with diffusers' PyTorch model (down residuals and mid residual) on tiny SD1-,
SD2- and SDXL-style configs, random perturbed weights saved with save_pretrained and loaded from disk by both;
and the UNet taking its residuals as diffusers' UNet2DConditionModel does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet

from sdjax import weights
from sdjax.models.controlnet import ControlNetConfig, ControlNetModel, scale_residuals
from sdjax.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from tests.reference import perturb_

jax.config.update("jax_default_matmul_precision", "highest")

TOLERANCE = 1e-4  # max abs error relative to the residual's max abs value
# SD 1.x's shape in miniature: conv projections, one head count for every block, published embedding widths.
TINY_SD1 = {
    "in_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "attention_head_dim": 2,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
}
# SD 2.x: linear projections, per-block heads, upcast attention, another frequency layout; a 2-stage (2x) control
# embedding of a 1-channel image in BGR order... and pooled residuals (ControlNet 1.1 shuffle's option).
TINY_SD2 = {
    "in_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "attention_head_dim": [2, 4, 4],
    "cross_attention_dim": 24,
    "norm_num_groups": 4,
    "use_linear_projection": True,
    "upcast_attention": True,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "transformer_layers_per_block": [1, 2, 1],
    "conditioning_channels": 1,
    "conditioning_embedding_out_channels": [8, 16],
    "controlnet_conditioning_channel_order": "bgr",
}
# SDXL: no attention in the first block, per-block depths, text_time added conditioning (6 ids).
TIME_DIM, POOLED = 8, 12
TINY_XL = {
    "in_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
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
    "conditioning_embedding_out_channels": [8, 16, 16],
}


def torch_controlnet_folder(config: dict, folder, seed: int = 0) -> TorchControlNet:
    torch.manual_seed(seed)
    model = perturb_(TorchControlNet(**config), seed)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def controlnet_inputs(config: dict, batch: int = 2, size: int = 8, seed: int = 1) -> dict:
    """Latents, timesteps, text, control image (values in [0, 1], as pipelines pass) and, for text_time, added
    conditions."""
    rng = np.random.default_rng(seed)
    f = 2 ** (len(config.get("conditioning_embedding_out_channels", [0] * 4)) - 1)
    inputs = {
        "sample": rng.standard_normal((batch, size, size, config["in_channels"]), dtype=np.float32),
        "timesteps": np.array([999, 13][:batch], dtype=np.int64),
        "context": rng.standard_normal((batch, 7, config["cross_attention_dim"]), dtype=np.float32),
        "cond": rng.random((batch, size * f, size * f, config.get("conditioning_channels", 3)), dtype=np.float32),
    }
    if config.get("addition_embed_type") == "text_time":
        inputs["text_embeds"] = rng.standard_normal((batch, POOLED), dtype=np.float32)
        inputs["time_ids"] = np.array(
            [[1024, 1024, 0, 0, 1024, 1024], [512, 768, 16, 48, 640, 896]][:batch], np.float32
        )
    return inputs


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def torch_residuals(model, inputs: dict, scale: float = 1.0, guess_mode: bool = False):
    added = {k: torch.from_numpy(inputs[k]) for k in ("text_embeds", "time_ids") if k in inputs}
    with torch.no_grad():
        down, mid = model(
            _nchw(inputs["sample"]),
            torch.from_numpy(inputs["timesteps"]),
            torch.from_numpy(inputs["context"]),
            _nchw(inputs["cond"]),
            conditioning_scale=scale,
            added_cond_kwargs=added or None,
            guess_mode=guess_mode,
            return_dict=False,
        )
    return [r.permute(0, 2, 3, 1).numpy() for r in down], mid.permute(0, 2, 3, 1).numpy()


def sdjax_residuals(module, params, inputs: dict, scale: float = 1.0, guess_mode: bool = False):
    added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}

    @jax.jit
    def run(params, inputs, scale):
        return module.apply(
            {"params": params},
            inputs["sample"],
            inputs["timesteps"],
            inputs["context"],
            inputs["cond"],
            scale,
            guess_mode=guess_mode,
            **{k: inputs[k] for k in added},
        )

    down, mid = run(params, inputs, jnp.float32(scale))
    return [np.asarray(r) for r in down], np.asarray(mid)


def relative_error(ours, reference) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float32) - reference)) / np.max(np.abs(reference)))


def residual_errors(ours, reference) -> float:
    (down, mid), (ref_down, ref_mid) = ours, reference
    assert [r.shape for r in down] == [r.shape for r in ref_down]
    assert mid.shape == ref_mid.shape
    return max(relative_error(a, b) for a, b in zip([*down, mid], [*ref_down, ref_mid], strict=True))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """The SD1-style ControlNet in diffusers and loaded from its folder by sdjax, with its unscaled residuals."""
    folder = tmp_path_factory.mktemp("controlnet_sd1")
    reference_model = torch_controlnet_folder(TINY_SD1, folder)
    module, params = weights.load_component(folder)
    inputs = controlnet_inputs(TINY_SD1)
    return reference_model, module, params, inputs, sdjax_residuals(module, params, inputs)


def test_sd1_residuals_match_diffusers(sd1):
    reference_model, module, _, inputs, ours = sd1
    assert isinstance(module, ControlNetModel)
    error = residual_errors(ours, torch_residuals(reference_model, inputs))
    print(f"ControlNet parity (SD 1.x style): max rel error {error:.2e}")
    assert error <= TOLERANCE


def test_guess_mode_scales_residuals_geometrically_as_diffusers(sd1):
    """Guess mode: residual i of n (the mid block last) times 0.6 * 10 ** (i / n - 1), as diffusers."""
    reference_model, _, _, inputs, (down, mid) = sd1
    reference = torch_residuals(reference_model, inputs, scale=0.6, guess_mode=True)
    scaled = scale_residuals(down, mid, 0.6, guess_mode=True)
    assert residual_errors(scaled, reference) <= TOLERANCE
    assert np.abs(scaled.down_block_res_samples[0]).max() < 0.07 * np.abs(down[0]).max()


@pytest.mark.parametrize(
    "config, scale, guess_mode",
    [
        pytest.param({**TINY_SD2, "global_pool_conditions": True}, 0.8, True, id="sd2_bgr_gray_pooled"),
        # The published SDXL layout (tests/test_controlnet_loading.py) covers text_time in the default suite.
        pytest.param(TINY_XL, 0.5, False, id="sdxl_text_time", marks=pytest.mark.slow),
    ],
)
def test_residuals_match_diffusers(config, scale, guess_mode, tmp_path):
    reference_model = torch_controlnet_folder(config, tmp_path)
    module, params = weights.load_component(tmp_path)
    inputs = controlnet_inputs(config)
    reference = torch_residuals(reference_model, inputs, scale, guess_mode)
    error = residual_errors(sdjax_residuals(module, params, inputs, scale, guess_mode), reference)
    print(f"ControlNet parity {config['down_block_types']} guess_mode={guess_mode}: max rel error {error:.2e}")
    assert error <= TOLERANCE


UNET_SD1 = {
    **{k: v for k, v in TINY_SD1.items() if k != "conditioning_embedding_out_channels"},
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "out_channels": 4,
}


def test_unet_adds_controlnet_residuals_as_diffusers(sd1, tmp_path):
    """The SD1-style UNet given the ControlNet's residuals (each from its own library) matches diffusers', and
    differs from the prediction without them."""
    reference_controlnet, _, _, inputs, (down, mid) = sd1
    torch.manual_seed(3)
    reference_unet = perturb_(TorchUNet(**UNET_SD1), seed=3)
    reference_unet.save_pretrained(tmp_path, safe_serialization=True)
    unet, params = weights.load_component(tmp_path)
    ref_down, ref_mid = torch_residuals(reference_controlnet, inputs)
    with torch.no_grad():
        reference = (
            reference_unet(
                _nchw(inputs["sample"]),
                torch.from_numpy(inputs["timesteps"]),
                torch.from_numpy(inputs["context"]),
                down_block_additional_residuals=[_nchw(r) for r in ref_down],
                mid_block_additional_residual=_nchw(ref_mid),
            )
            .sample.permute(0, 2, 3, 1)
            .numpy()
        )

    @jax.jit
    def predict(params, residuals):
        return unet.apply(
            {"params": params},
            inputs["sample"],
            inputs["timesteps"],
            inputs["context"],
            down_block_additional_residuals=residuals[0],
            mid_block_additional_residual=residuals[1],
        )

    ours = predict(params, (down, mid))
    error = relative_error(ours, reference)
    print(f"UNet with ControlNet residuals: max rel error {error:.2e}")
    assert error <= TOLERANCE
    plain = predict(params, ([np.zeros_like(r) for r in down], np.zeros_like(mid)))
    assert relative_error(plain, reference) > 1e-2


def test_parameter_names_and_shapes_match_diffusers_state_dict():
    reference_model = TorchControlNet(**TINY_XL)
    module = ControlNetModel(ControlNetConfig.from_dict(TINY_XL))
    exported = weights.flax_to_torch(jax.tree.map(lambda x: np.zeros(x.shape), weights.param_shapes(module)))
    assert {k: v.shape for k, v in exported.items()} == {
        k: tuple(v.shape) for k, v in reference_model.state_dict().items()
    }


def test_residual_count_and_channels_are_the_unets_skips():
    config = ControlNetConfig.from_dict(TINY_XL)
    unet_fields = {k: v for k, v in TINY_XL.items() if k != "conditioning_embedding_out_channels"}
    unet_config = UNet2DConditionConfig.from_dict(
        {**unet_fields, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
    )
    module = ControlNetModel(config)
    down, mid = jax.eval_shape(lambda: module.init_with_output(jax.random.key(0), *module.dummy_inputs())[0])
    assert tuple(r.shape[-1] for r in down) == config.skip_channels() == unet_config.skip_channels()
    assert len(down) == 1 + 3 * 2 + 2  # conv_in, 2 layers per block, 2 downsamplers
    assert mid.shape[-1] == config.block_out_channels[-1]


@pytest.mark.parametrize(
    "residuals, message",
    [
        ("down_only", "come in pairs"),
        ("one_short", r"must be 6 arrays shaped as the UNet's skip connections"),
        ("wrong_mid", "mid_block_additional_residual must have shape"),
    ],
)
def test_unet_refuses_residuals_that_do_not_fit_in_one_line(residuals, message):
    unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict(UNET_SD1))
    sample, timesteps, context = unet.dummy_inputs()
    skips = [np.zeros((1, 1, 1, c), np.float32) for c in unet.config.skip_channels()]
    mid = np.zeros((1, 1, 1, 64), np.float32)
    kwargs = {
        "down_only": {"down_block_additional_residuals": skips},
        "one_short": {"down_block_additional_residuals": skips[:-1], "mid_block_additional_residual": mid},
        "wrong_mid": {"down_block_additional_residuals": skips, "mid_block_additional_residual": mid[..., :32]},
    }[residuals]
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(unet.init, jax.random.key(0), sample, timesteps, context, **kwargs)


def test_control_image_of_the_wrong_size_is_one_clear_error():
    module = ControlNetModel(ControlNetConfig.from_dict(TINY_SD1))
    sample, timesteps, context, cond, scale = module.dummy_inputs()
    with pytest.raises(ValueError, match=r"controlnet_cond must be the control image \(1, 16, 16, 3\)"):
        jax.eval_shape(module.init, jax.random.key(0), sample, timesteps, context, cond[:, :8], scale)
