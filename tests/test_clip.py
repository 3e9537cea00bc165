"""CLIPTextModel and CLIPTextModelWithProjection: numerical parity with transformers' PyTorch classes on tiny
configs, checkpoint layouts, and the SD 1.5 text encoder's shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from sdjax import weights
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from sdjax.models.config import UnsupportedConfigError
from tests.reference import perturb_

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB, LENGTH = 1000, 16
BOS, EOS, PAD = VOCAB - 2, VOCAB - 1, 0
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=LENGTH,
    projection_dim=32,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
)
SD15_TEXT_ENCODER = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
    "vocab_size": 49408,
}


def relative_error(ours, reference) -> float:
    reference = np.asarray(reference, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())


def make_pair(folder, hidden_act: str):
    """A perturbed random transformers CLIPTextModel saved to ``folder`` and loaded back into sdjax."""
    torch.manual_seed(0)
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_act=hidden_act, **TINY)).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference.save_pretrained(folder, safe_serialization=True)
    module, params = weights.load_component(folder)
    return reference, module, params, folder


@pytest.fixture(scope="module")
def quick_gelu_pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("clip_quick_gelu"), "quick_gelu")


@pytest.fixture(scope="module")
def input_ids() -> np.ndarray:
    """BOS, random tokens, EOS, then padding: with the pad id (SD 2.x) and with EOS repeated (SD 1.x)."""
    rng = np.random.default_rng(0)
    ids = np.full((2, LENGTH), PAD, np.int32)
    ids[1] = EOS
    for row, n in ((0, 5), (1, 9)):
        ids[row, 0], ids[row, n + 1] = BOS, EOS
        ids[row, 1 : n + 1] = rng.integers(1, VOCAB - 2, n)
    return ids


def torch_outputs(reference, input_ids):
    with torch.no_grad():
        return reference(torch.from_numpy(input_ids).long(), output_hidden_states=True)


def test_quick_gelu_last_hidden_state_matches_transformers(quick_gelu_pair, input_ids):
    reference, module, params, _ = quick_gelu_pair
    ours = module.apply({"params": params}, jnp.asarray(input_ids))
    error = relative_error(ours, torch_outputs(reference, input_ids).last_hidden_state.numpy())
    print(f"quick_gelu last_hidden_state relative error {error:.2e}")
    assert ours.shape == (2, LENGTH, 64)
    assert error <= 1e-4


def test_gelu_last_hidden_state_matches_transformers(tmp_path, input_ids):
    reference, module, params, _ = make_pair(tmp_path, "gelu")
    assert module.config.hidden_act == "gelu"
    ours = module.apply({"params": params}, jnp.asarray(input_ids))
    error = relative_error(ours, torch_outputs(reference, input_ids).last_hidden_state.numpy())
    print(f"gelu last_hidden_state relative error {error:.2e}")
    assert error <= 1e-4


def test_hidden_states_match_transformers(quick_gelu_pair, input_ids):
    reference, module, params, _ = quick_gelu_pair
    _, ours = module.apply({"params": params}, jnp.asarray(input_ids), output_hidden_states=True)
    theirs = torch_outputs(reference, input_ids).hidden_states
    assert len(ours) == len(theirs) == 4
    errors = [relative_error(a, b.numpy()) for a, b in zip(ours, theirs, strict=True)]
    print(f"hidden_states relative errors {', '.join(f'{e:.2e}' for e in errors)}")
    assert max(errors) <= 1e-4


def test_clip_skip_output_matches_transformers_final_layer_norm(quick_gelu_pair, input_ids):
    """diffusers' clip_skip=1: final_layer_norm(hidden_states[-2])."""
    reference, module, params, _ = quick_gelu_pair
    _, hidden_states = module.apply({"params": params}, jnp.asarray(input_ids), output_hidden_states=True)
    ours = module.apply({"params": params}, hidden_states[-2], method=module.apply_final_layer_norm)
    with torch.no_grad():
        theirs = reference.final_layer_norm(torch_outputs(reference, input_ids).hidden_states[-2]).numpy()
    assert relative_error(ours, theirs) <= 1e-4


def test_attention_is_causal(quick_gelu_pair, input_ids):
    _, module, params, _ = quick_gelu_pair
    changed = input_ids.copy()
    changed[:, 8:] = EOS - 1
    a, b = (module.apply({"params": params}, jnp.asarray(ids)) for ids in (input_ids, changed))
    np.testing.assert_allclose(a[:, :8], b[:, :8], rtol=0, atol=1e-6)
    assert not np.allclose(a[:, 8:], b[:, 8:])


def test_stable_diffusion_text_model_prefix_loads(quick_gelu_pair, tmp_path):
    """SD checkpoints (transformers 4 layout) store text_model.embeddings... and the position_ids buffer."""
    _, _, params, source = quick_gelu_pair
    state = {f"text_model.{k}": v for k, v in load_file(source / "model.safetensors").items()}
    state["text_model.embeddings.position_ids"] = torch.arange(LENGTH)[None]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    _, loaded = weights.load_component(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_saved_component_loads_in_transformers(quick_gelu_pair, input_ids, tmp_path):
    """Written in the Stable Diffusion layout (text_model. prefix), which transformers 4 and 5 both read."""
    reference, module, params, _ = quick_gelu_pair
    weights.save_component(module, params, tmp_path)
    assert all(k.startswith("text_model.") for k in load_file(tmp_path / "model.safetensors"))
    reloaded = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    ours = torch_outputs(reloaded, input_ids).last_hidden_state.numpy()
    theirs = torch_outputs(reference, input_ids).last_hidden_state.numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_sd15_text_encoder_parameter_count():
    module = CLIPTextModel(CLIPTextConfig.from_dict(SD15_TEXT_ENCODER))
    shapes = jax.eval_shape(module.init, jax.random.key(0), *module.dummy_inputs())["params"]
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 123_060_480


def test_unsupported_activation_is_an_error():
    with pytest.raises(UnsupportedConfigError, match="hidden_act='gelu_new'.*quick_gelu, gelu"):
        CLIPTextConfig.from_dict(dict(SD15_TEXT_ENCODER, hidden_act="gelu_new"))


def test_unsupported_config_field_is_named_in_the_error():
    with pytest.raises(UnsupportedConfigError, match="attention_dropout=0.1"):
        CLIPTextConfig.from_dict(dict(SD15_TEXT_ENCODER, attention_dropout=0.1))


def test_sequence_longer_than_position_table_is_an_error(quick_gelu_pair):
    _, module, params, _ = quick_gelu_pair
    with pytest.raises(ValueError, match=f"max_position_embeddings={LENGTH}"):
        module.apply({"params": params}, jnp.zeros((1, LENGTH + 1), jnp.int32))


@pytest.mark.parametrize("eos_token_id", [2, EOS], ids=["legacy-eos-2", "eos-id"])
def test_pooled_output_follows_transformers_pooling_rule(tmp_path, eos_token_id):
    """Legacy configs (eos_token_id 2, as SD 1.x / 2.x publish) pool at argmax(ids); newer ones at the first EOS.
    A token with an id above EOS (as textual inversion adds) before the EOS tells the two rules apart."""
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**{**TINY, "vocab_size": VOCAB + 2, "eos_token_id": eos_token_id})
    reference = transformers.CLIPTextModel(config).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    module, params = weights.load_component(tmp_path)
    ids = np.array([[BOS, 5, VOCAB + 1, 7, EOS] + [EOS] * (LENGTH - 5)], np.int32)
    with torch.no_grad():
        ref = reference(torch.from_numpy(ids).long()).pooler_output.numpy()
    last = module.apply({"params": params}, jnp.asarray(ids))
    pooled = module.pooled_output(last, jnp.asarray(ids))
    assert relative_error(pooled, ref) < 1e-5
    expected_position = 2 if eos_token_id == 2 else 4
    np.testing.assert_allclose(pooled, np.asarray(last)[:, expected_position], rtol=0, atol=0)


# --- CLIPTextModelWithProjection (SDXL text_encoder_2, the refiner's text encoder)


def make_projection_pair(folder, eos_token_id: int):
    """A perturbed random transformers CLIPTextModelWithProjection (gelu, as OpenCLIP bigG) with two ids above EOS
    in its vocabulary (as textual inversion adds), saved to ``folder`` and loaded back into sdjax."""
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        **{**TINY, "vocab_size": VOCAB + 2, "eos_token_id": eos_token_id, "hidden_act": "gelu"}
    )
    reference = perturb_(transformers.CLIPTextModelWithProjection(config), seed=1)
    reference.save_pretrained(folder, safe_serialization=True)
    module, params = weights.load_component(folder)
    return reference, module, params


@pytest.fixture(scope="module", params=[2, EOS], ids=["legacy-eos-2", "eos-id"])
def projection_pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"clip_projection_{request.param}")
    return (*make_projection_pair(folder, request.param), folder)


def ids_where_pooling_rules_differ() -> np.ndarray:
    """Row 0: an added token (id above EOS) before the EOS, so argmax and first-EOS pick different positions;
    row 1: plain BOS, tokens, EOS, padding, where both rules agree."""
    ids = np.full((2, LENGTH), PAD, np.int32)
    ids[0, :5] = [BOS, 5, VOCAB + 1, 7, EOS]
    ids[0, 5:] = EOS
    ids[1, :4] = [BOS, 11, 12, EOS]
    return ids


def test_projection_model_loads_as_its_own_class(projection_pair):
    _, module, params, _ = projection_pair
    assert type(module) is CLIPTextModelWithProjection
    assert params["text_projection"]["kernel"].shape == (32, 64)  # bias-free Dense to projection_dim, (out, in)
    assert "bias" not in params["text_projection"]


def test_projection_text_embeds_match_transformers(projection_pair):
    reference, module, params, _ = projection_pair
    ids = ids_where_pooling_rules_differ()
    text_embeds, last = module.apply({"params": params}, jnp.asarray(ids))
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids).long())
    errors = [
        relative_error(text_embeds, theirs.text_embeds.numpy()),
        relative_error(last, theirs.last_hidden_state.numpy()),
    ]
    print(f"eos_token_id={module.config.eos_token_id}: text_embeds {errors[0]:.2e}, last_hidden_state {errors[1]:.2e}")
    assert text_embeds.shape == (2, 32) and last.shape == (2, LENGTH, 64)
    assert max(errors) <= 1e-4


def test_projection_hidden_states_match_transformers(projection_pair):
    reference, module, params, _ = projection_pair
    ids = ids_where_pooling_rules_differ()
    text_embeds, _, ours = module.apply({"params": params}, jnp.asarray(ids), output_hidden_states=True)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids).long(), output_hidden_states=True)
    assert len(ours) == len(theirs.hidden_states) == TINY["num_hidden_layers"] + 1
    errors = [relative_error(a, b.numpy()) for a, b in zip(ours, theirs.hidden_states, strict=True)]
    assert max(errors) <= 1e-4
    # SDXL's prompt embedding is the penultimate state as is: not passed through final_layer_norm.
    assert relative_error(ours[-2], theirs.last_hidden_state.numpy()) > 1e-2
    assert relative_error(text_embeds, theirs.text_embeds.numpy()) <= 1e-4


def test_projection_pools_by_the_legacy_or_eos_rule(projection_pair):
    """text_embeds is text_projection of the state at argmax(ids) (legacy eos_token_id 2) or at the first EOS."""
    _, module, params, _ = projection_pair
    ids = ids_where_pooling_rules_differ()
    text_embeds, last = module.apply({"params": params}, jnp.asarray(ids))
    position = 2 if module.config.eos_token_id == 2 else 4
    kernel = np.asarray(params["text_projection"]["kernel"], np.float64)
    expected = np.asarray(last, np.float64)[0, position] @ kernel.T
    np.testing.assert_allclose(np.asarray(text_embeds[0], np.float64), expected, rtol=1e-5, atol=1e-5)


def test_projection_model_saves_in_the_transformers_layout(projection_pair, tmp_path):
    reference, module, params, _ = projection_pair
    weights.save_component(module, params, tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "text_projection.weight" in keys and all(
        k.startswith("text_model.") for k in keys - {"text_projection.weight"}
    )
    reloaded = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path).eval()
    ids = ids_where_pooling_rules_differ()
    with torch.no_grad():
        ours, theirs = (m(torch.from_numpy(ids).long()).text_embeds.numpy() for m in (reloaded, reference))
    np.testing.assert_array_equal(ours, theirs)
    _, reloaded_params = weights.load_component(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, reloaded_params, params)


def test_projection_model_needs_projection_dim():
    from sdjax.models.clip import CLIPTextModelWithProjectionConfig

    with pytest.raises(ValueError, match="projection_dim=None"):
        CLIPTextModelWithProjectionConfig.from_dict(dict(TINY, projection_dim=None))
