"""AutoencoderKL: numerical parity with diffusers' PyTorch AutoencoderKL on a tiny config, and the SD 1.5 shape."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.torch import load_file, save_file

from sdjax import weights
from sdjax.models.config import UnsupportedConfigError
from sdjax.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian

jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
)
SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def relative_error(ours, reference) -> float:
    reference = np.asarray(reference, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A perturbed random diffusers VAE and the same weights loaded into sdjax."""
    torch.manual_seed(0)
    reference = TorchAutoencoderKL(**TINY).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("vae")
    reference.save_pretrained(folder, safe_serialization=True)
    module, params = weights.load_component(folder)
    return reference, module, params, folder


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_posterior(pair, images):
    reference = pair[0]
    with torch.no_grad():
        return reference.encode(torch.from_numpy(nchw(images))).latent_dist


@pytest.fixture(scope="module")
def posterior(pair, images) -> DiagonalGaussian:
    _, module, params, _ = pair
    return module.apply({"params": params}, jnp.asarray(images), method=module.encode)


def test_loaded_module_has_the_config_json_architecture(pair):
    module = pair[1]
    assert module.config.block_out_channels == (16, 32)
    assert module.config.scaling_factor == pytest.approx(0.18215)


def test_encoder_mean_matches_diffusers(posterior, torch_posterior):
    error = relative_error(posterior.mean, nhwc(torch_posterior.mean))
    print(f"encoder mean relative error {error:.2e}")
    assert posterior.mean.shape == (2, 8, 8, 4)
    assert error <= 1e-4


def test_encoder_logvar_matches_diffusers(posterior, torch_posterior):
    error = relative_error(posterior.logvar, nhwc(torch_posterior.logvar))
    print(f"encoder logvar relative error {error:.2e}")
    assert error <= 1e-4


def test_decoder_matches_diffusers(pair):
    reference, module, params, _ = pair
    z = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = module.apply({"params": params}, jnp.asarray(z), method=module.decode)
    with torch.no_grad():
        theirs = nhwc(reference.decode(torch.from_numpy(nchw(z))).sample)
    error = relative_error(ours, theirs)
    print(f"decoder relative error {error:.2e}")
    assert ours.shape == (2, 16, 16, 3)
    assert error <= 1e-4


def test_kl_matches_diffusers(posterior, torch_posterior):
    ours = posterior.kl()
    theirs = torch_posterior.kl().numpy()
    print(f"kl relative error {relative_error(ours, theirs):.2e}")
    assert ours.shape == (2,)
    assert relative_error(ours, theirs) <= 1e-4


def test_kl_is_zero_for_the_standard_normal():
    posterior = DiagonalGaussian(mean=jnp.zeros((1, 2, 2, 4)), logvar=jnp.zeros((1, 2, 2, 4)))
    np.testing.assert_allclose(posterior.kl(), [0.0], atol=1e-7)


def test_logvar_is_clipped_to_diffusers_range():
    moments = jnp.concatenate([jnp.zeros((1, 1, 2, 1)), jnp.array([-100.0, 100.0]).reshape(1, 1, 2, 1)], axis=-1)
    np.testing.assert_array_equal(DiagonalGaussian.from_moments(moments).logvar.ravel(), [-30.0, 20.0])


def test_sample_has_posterior_mean_and_std():
    posterior = DiagonalGaussian(mean=jnp.full((2, 32, 32, 4), 2.0), logvar=jnp.full((2, 32, 32, 4), np.log(0.25)))
    z = posterior.sample(jax.random.key(0))
    assert abs(float(z.mean()) - 2.0) < 0.02
    assert abs(float(z.std()) - 0.5) < 0.02


def test_posterior_crosses_jit(pair, images):
    _, module, params, _ = pair
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))
    posterior = encode(params, jnp.asarray(images))
    assert isinstance(posterior, DiagonalGaussian)
    assert posterior.logvar.dtype == jnp.float32


def test_call_reconstructs_from_posterior_mean(pair, images):
    _, module, params, _ = pair
    reconstruction, posterior = module.apply({"params": params}, jnp.asarray(images))
    decoded = module.apply({"params": params}, posterior.mean, method=module.decode)
    np.testing.assert_array_equal(reconstruction, decoded)


def test_sampling_posterior_without_rng_is_an_error(pair, images):
    _, module, params, _ = pair
    with pytest.raises(ValueError, match="rng"):
        module.apply({"params": params}, jnp.asarray(images), sample_posterior=True)


def test_image_size_not_divisible_by_downsampling_factor_is_an_error(pair):
    _, module, params, _ = pair
    with pytest.raises(ValueError, match="multiples of 2"):
        module.apply({"params": params}, jnp.zeros((1, 15, 16, 3)), method=module.encode)


def test_legacy_attention_key_names_load(pair, tmp_path):
    """diffusers < 0.15 saved the VAE attention as query/key/value/proj_attn; LDM stored them as 1x1 convs."""
    _, _, params, folder = pair
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in state.items():
        for new, old in legacy_names.items():
            if f"attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value[:, :, None, None] if value.ndim == 2 else value
        legacy[key] = value
    assert any(".query.weight" in k for k in legacy)
    save_file(legacy, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    _, loaded = weights.load_component(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_sd15_vae_parameter_count():
    module = AutoencoderKL(AutoencoderKLConfig.from_dict(SD15_VAE))
    shapes = jax.eval_shape(module.init, jax.random.key(0), *module.dummy_inputs())["params"]
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 83_653_863


def test_unsupported_config_field_is_named_in_the_error():
    config = dict(SD15_VAE, latents_mean=[0.0] * 4)
    with pytest.raises(UnsupportedConfigError, match="latents_mean"):
        AutoencoderKLConfig.from_dict(config)


def test_unsupported_block_type_is_an_error():
    config = dict(SD15_VAE, down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"])
    with pytest.raises(UnsupportedConfigError, match="AttnDownEncoderBlock2D"):
        AutoencoderKLConfig.from_dict(config)


def test_config_round_trips_through_diffusers_json():
    config = AutoencoderKLConfig.from_dict(SD15_VAE)
    assert AutoencoderKLConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
