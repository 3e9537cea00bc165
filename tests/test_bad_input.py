"""Bad input, table-driven: one clear line naming what is wrong and what is accepted, a non-zero exit for the
CLIs, nothing written or deleted that was not the command's own; valid-but-odd input (16-bit, palette, RGBA
images) gives the right result."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from PIL import Image

import sample
import sdjax
from sdjax import export
from sdjax.images import load_image
from sdjax.pipeline import PipelineError

GENERATE_CASES = [
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(guidance_scale=-2.0), "guidance_scale must be a finite number >= 0, got -2.0"),
    (dict(eta=float("nan")), "eta must be a finite number"),
    (dict(eta=-0.5), "eta must be a finite number"),
    (dict(strength=float("nan"), init_image=np.zeros((16, 16, 3), np.uint8)), "strength must be a finite number"),
    (dict(strength=1.5, init_image=np.zeros((16, 16, 3), np.uint8)), "strength must be a finite number in \\(0, 1\\]"),
    (dict(strength=0.0, init_image=np.zeros((16, 16, 3), np.uint8)), "strength must be a finite number in \\(0, 1\\]"),
    (dict(height=0), "height and width must be multiples of"),
    (dict(height=100000, width=100000), "height and width must be multiples of .* in \\[2, 4096\\]"),
    (dict(height=17), "height and width must be multiples of 2"),
    (dict(height=4096, width=4096), "need at least .* GiB for the UNet's attention on cpu, which has .* GiB"),
    (dict(height=16.0), "height must be an int"),
    (dict(seed=-1), "seed must be an int in"),
    (dict(seed=2**64), "seed must be an int in"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be an int >= 1"),
    (dict(negative_prompts=5), "negative_prompts must be a string or a non-empty list of strings, got 5"),
    (dict(sampler="euler", use_karras_sigmas="yes"), "use_karras_sigmas must be True, False or None"),
    (dict(num_images_per_prompt=10**9), "1000000000 images of 16x16 need more than the host's .* GiB"),
    (dict(sampler="plms"), "unknown sampler 'plms'"),
    (dict(num_inference_steps=0), "num_inference_steps must be an int in \\[1, 1000\\]"),
    (dict(num_inference_steps="20"), "num_inference_steps must be an int in \\[1, 1000\\] .*got '20'"),
    (dict(negative_prompts="bad \ud800 text"), "negative_prompts is not valid text: '\\\\ud800' at character 4"),
    (dict(latents=np.full((1, 8, 8, 4), np.nan, np.float32)), "latents contain NaN or inf"),
    (dict(init_image=np.full((16, 16, 3), 200.0, np.float32)), "float init image must be finite and in \\[0, 1\\]"),
    (dict(init_image=np.zeros((16, 16, 3), np.uint16)), "uint8 or float in \\[0, 1\\]"),
    (dict(init_image=np.zeros((16, 16), np.uint8)), "init image must be \\(H, W, 3\\)"),
]


@pytest.mark.parametrize("kwargs, message", GENERATE_CASES, ids=[m[:40] for _, m in GENERATE_CASES])
def test_generate_rejects_bad_arguments_in_one_line(tiny_pipe, kwargs, message):
    kwargs = {"num_inference_steps": 2, **kwargs}
    with pytest.raises(PipelineError, match=message) as info:
        tiny_pipe.generate(["a red circle"], **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("layers_per_block", "2", "layers_per_block='2' has the wrong type; expected int"),
        ("block_out_channels", 32, "block_out_channels=32 has the wrong type; expected tuple"),
        ("use_linear_projection", "yes", "use_linear_projection='yes' has the wrong type; expected bool"),
        ("cross_attention_dim", True, "cross_attention_dim=True has the wrong type"),
    ],
)
def test_config_values_of_the_wrong_type_name_the_file_and_field(tiny_model, tmp_path, capsys, field, value, message):
    import json
    import shutil

    folder = tmp_path / "typed"
    shutil.copytree(tiny_model, folder)
    config_file = folder / "unet" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), field: value}))
    with pytest.raises(ValueError, match=message) as info:
        sdjax.StableDiffusion.from_pretrained(folder)
    assert str(config_file) in str(info.value) and "\n" not in str(info.value)
    assert sample.main(["--model", str(folder), "--out", str(tmp_path / "out"), "--prompt", "a"]) == 2
    assert message.split(";")[0] in capsys.readouterr().err


@pytest.mark.parametrize("prompts", [123, [1, 2], [], None])
def test_prompts_that_are_not_strings_are_one_line(tiny_pipe, prompts):
    with pytest.raises(PipelineError, match="prompts must be a string or a non-empty list of strings"):
        tiny_pipe.generate(prompts, num_inference_steps=2)


@pytest.mark.parametrize("dtype", ["bogus", "float64", "int8"])
def test_unsupported_dtypes_are_refused_before_loading(tiny_model, dtype):
    with pytest.raises(PipelineError, match=f"dtype '{dtype}' is not supported; accepted: float32, bfloat16"):
        sdjax.StableDiffusion.from_pretrained(tiny_model, dtype=dtype)


def test_save_pretrained_refuses_a_file(tiny_pipe, tmp_path):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(PipelineError, match="is a file; save_pretrained writes a folder"):
        tiny_pipe.save_pretrained(tmp_path / "f")
    assert (tmp_path / "f").read_text() == "mine"


def test_attention_memory_lower_bound_is_the_score_matrix(tiny_pipe):
    from sdjax import denoise

    unet = tiny_pipe.unet
    heads, tokens = unet.config.heads()[0], 8 * 8
    assert denoise.attention_scores_bytes(unet, 2, 8, 8) == 2 * heads * tokens**2 * 4  # first block, float32


def test_out_of_memory_at_run_time_is_one_line(tiny_pipe, monkeypatch):
    from sdjax import generation

    class Exhausted:  # what XLA raises when the program does not fit
        def lower(self, *args):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB")

    monkeypatch.setattr(generation.denoise, "compiled_denoise", lambda *args, **kwargs: Exhausted())
    fresh = dataclasses.replace(tiny_pipe, _compiled={}, _replicated={})
    with pytest.raises(PipelineError, match="out of memory on cpu generating 1 image"):
        fresh.generate(["a"], num_inference_steps=2)


def test_non_finite_weights_are_named_on_load(tiny_model, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(tiny_model, folder)
    (file,) = (folder / "unet").glob("*.safetensors")
    state = load_file(str(file))
    state["conv_in.weight"] = np.full_like(state["conv_in.weight"], np.nan)
    save_file(state, str(file))
    with pytest.raises(ValueError, match="NaN or inf values: conv_in/kernel"):
        sdjax.StableDiffusion.from_pretrained(folder)


def test_non_finite_images_are_an_error_not_a_black_png(tiny_model):
    import jax

    pipe = sdjax.StableDiffusion.from_pretrained(tiny_model)  # its own: the session's tiny_pipe must stay finite
    pipe.params["vae"] = jax.tree.map(lambda x: x * np.inf, pipe.params["vae"])
    with pytest.raises(PipelineError, match="non-finite"):
        pipe.generate(["a red circle"], num_inference_steps=2)


# ------------------------------------------------------------------------------------------- odd but valid images


def _gradient(size: int = 16) -> np.ndarray:
    return np.linspace(0, 1, size * size).reshape(size, size)


@pytest.mark.parametrize(
    "make",
    [
        lambda g: Image.fromarray((g * 65535).astype(np.uint16)),  # 16-bit grayscale ("I;16")
        lambda g: Image.fromarray((g * 255).astype(np.uint8)).convert("P"),  # palette
        lambda g: Image.fromarray((g * 255).astype(np.uint8)).convert("RGBA"),  # RGBA, opaque
        lambda g: Image.fromarray((g * 255).astype(np.uint8)),  # 8-bit grayscale
    ],
    ids=["16-bit", "palette", "rgba", "grayscale"],
)
def test_init_images_of_any_mode_read_as_their_pixels(make, tmp_path):
    path = tmp_path / "init.png"
    make(_gradient()).save(path)
    image = np.asarray(load_image(path, 16, 16))
    expected = _gradient() * 2 - 1
    assert np.abs(image[..., 0] - expected).max() < 0.03  # 8-bit rounding + LANCZOS at the same size


def test_transparent_pixels_read_as_white(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)  # fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert np.allclose(np.asarray(load_image(tmp_path / "clear.png", 16, 16)), 1.0)


# ------------------------------------------------------------------------------------------- sample.py

SAMPLE_CASES = [
    (["--guidance", "inf"], "--guidance must be a finite number >= 0, got inf"),
    (["--eta", "nan"], "--eta must be a finite number >= 0"),
    (["--height", "0"], "--height must be in"),
    (["--height", "100000", "--width", "100000"], "--height must be in"),
    (["--num-images", "0"], "--num-images must be an int >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--seed", "-3"], "--seed must be an int"),
    (["--strength", "1.5", "--init-image", "x.png"], "--strength must be a finite number in (0, 1], got 1.5"),
    (["--strength", "0", "--init-image", "x.png"], "--strength must be a finite number in (0, 1], got 0.0"),
    # Options that would do nothing in this mode name the mode they need.
    (["--strength", "0.6"], "--strength applies to image-to-image: pass --init-image FILE too"),
    (["--high-noise-frac", "0.7"], "--high-noise-frac applies to the SDXL base -> refiner hand-off"),
    (["--eta", "0.5", "--sampler", "euler"], "--eta applies to --sampler ddim or tcd; this run's sampler is euler"),
    (["--negative-prompt", "blurry", "--guidance", "1"], "--negative-prompt needs classifier-free guidance"),
    (["--prompt", "bad \udcff bytes"], "--prompt is not valid text: '\\udcff' at character 4"),
]


@pytest.mark.parametrize("extra, message", SAMPLE_CASES, ids=[m[:30] for _, m in SAMPLE_CASES])
def test_sample_cli_rejects_bad_arguments_before_loading(tiny_model, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code = sample.main(["--model", str(tiny_model / "missing"), "--prompt", "x", "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert not out.exists()  # checked before the (missing) model was touched: nothing created


def test_sample_cli_rejects_an_unreadable_init_image_and_a_file_as_out(tiny_model, tmp_path, capsys):
    (tmp_path / "not_an_image.png").write_text("hello")
    args = ["--model", str(tiny_model), "--prompt", "x", "--steps", "2"]
    assert sample.main([*args, "--init-image", str(tmp_path / "not_an_image.png"), "--out", str(tmp_path / "o")]) == 2
    assert "cannot be read as an image" in capsys.readouterr().err
    (tmp_path / "file").write_text("keep me")
    assert sample.main([*args, "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep me"


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A 20000x20000 PNG (400 megapixels, 48 KB on disk): PIL refuses it as a decompression bomb."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (20000, 20000)).save(path, optimize=True)
    return path


def test_a_decompression_bomb_is_one_line_in_the_library(tiny_pipe, bomb):
    with pytest.raises(PipelineError, match="init image .*bomb.png is refused: Image size \\(400000000 pixels\\)") as e:
        tiny_pipe.generate(["a red circle"], num_inference_steps=2, init_image=bomb)
    assert "\n" not in str(e.value)


def test_a_decompression_bomb_is_one_line_in_the_cli(tiny_model, bomb, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(tiny_model), "--prompt", "x", "--init-image", str(bomb), "--out", str(out)]
    assert sample.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: init image") and "exceeds limit" in err and "\n" not in err
    assert not out.exists() and bomb.stat().st_size < 100_000


@pytest.mark.parametrize("prompts", ["\ud800", ["fine", "a \udcff b"]], ids=["str", "list"])
def test_prompts_with_lone_surrogates_are_one_line(tiny_pipe, prompts):
    with pytest.raises(PipelineError, match="prompts is not valid text: .* is a lone surrogate .*pass UTF-8 text"):
        tiny_pipe.generate(prompts, num_inference_steps=2)


@pytest.mark.parametrize("option", [dict(tokenizer_path="tok"), dict(prediction_type="v_prediction")], ids=str)
def test_single_file_options_on_a_folder_are_refused(tiny_model, option):
    name = next(iter(option))
    with pytest.raises(PipelineError, match=f"{name} applies to SD 1.x / 2.x single-file checkpoints; .* a folder"):
        sdjax.StableDiffusion.from_pretrained(tiny_model, **option)


def test_options_the_mode_ignores_are_refused_after_loading_and_leave_nothing(tiny_model, tmp_path, capsys):
    # The shapes of these runs are only known once the model is: its sampler (ddim) and guidance (7.5).
    out = tmp_path / "out"
    base = ["--model", str(tiny_model), "--prompt", "x", "--steps", "2", "--out", str(out)]
    assert sample.main([*base, "--tokenizer", str(tmp_path)]) == 2
    assert "--tokenizer applies to single-file .safetensors checkpoints" in capsys.readouterr().err
    assert sample.main([*base, "--prompt-2", "y"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--prompt-2 applies to SDXL models" in err and "\n" not in err
    assert not out.exists()  # the folder this run created for its images is removed again


def test_sample_cli_refuses_a_read_only_out_folder(tiny_model, tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert sample.main(["--model", str(tiny_model), "--prompt", "x", "--out", str(ro)]) == 2
    assert "not a writable folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("where", ["cwd", "source", "parent"])
def test_export_refuses_the_current_folder_the_source_and_its_parents(tiny_model, tmp_path, monkeypatch, capsys, where):
    import shutil

    source = tmp_path / "work" / "source"
    shutil.copytree(tiny_model, source)
    (tmp_path / "work" / "sibling.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path / "work")
    destination = {"cwd": ".", "source": str(source), "parent": str(tmp_path / "work")}[where]
    assert export.main([str(source), destination, "--overwrite"]) == 2
    assert "the current folder, the source or a folder holding the source" in capsys.readouterr().err
    assert (tmp_path / "work" / "sibling.txt").read_text() == "keep me" and (source / "model_index.json").is_file()


def test_export_refuses_to_replace_a_folder_of_other_files(tiny_model, tmp_path, capsys):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"precious")
    assert export.main([str(tiny_model), str(other), "--overwrite"]) == 2
    assert "is not a diffusers model folder (holiday.jpg)" in capsys.readouterr().err
    assert (other / "holiday.jpg").read_bytes() == b"precious"


def test_export_overwrite_replaces_a_model_folder(tiny_model, tmp_path):
    assert export.main([str(tiny_model), str(tmp_path / "out")]) == 0
    assert export.main([str(tiny_model), str(tmp_path / "out"), "--overwrite"]) == 0
    assert (tmp_path / "out" / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or set-aside folder left


def test_written_weight_files_follow_the_umask(tiny_model, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        assert export.main([str(tiny_model), str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    for file in (tmp_path / "out").rglob("*.safetensors"):
        assert file.stat().st_mode & 0o777 == 0o644, file


# ------------------------------------------------------------------------------------------- training


def _tiny_config(stage: str = "vae"):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / ("shapes64_vae.py" if stage == "vae" else "shapes64.py")
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("tiny")


TRAIN_CASES = [
    ({"optim.lr": -1e-3}, "optim.lr must be a finite number > 0"),
    ({"optim.lr": float("nan")}, "optim.lr must be a finite number > 0"),
    ({"steps": 0}, "steps must be an int >= 1"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"data.source": "/no/such/folder"}, "data.source /no/such/folder does not exist"),
    ({"stage": "lora2"}, "unknown stage 'lora2'"),
    ({"eval_every": -2}, "eval_every must be an int >= 0"),
]


@pytest.mark.parametrize("overrides, message", TRAIN_CASES, ids=[m[:30] for _, m in TRAIN_CASES])
def test_bad_training_configs_fail_before_the_workdir_exists(tmp_path, overrides, message):
    from sdjax.train import checks, loop

    config = _tiny_config()
    for key, value in overrides.items():
        *parents, name = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[name] = value
    with pytest.raises(checks.TrainConfigError, match=message):
        loop.train_and_evaluate(config, tmp_path / "workdir")
    assert not (tmp_path / "workdir").exists()


def test_an_empty_data_folder_is_refused(tmp_path):
    from sdjax.train import checks, loop

    (tmp_path / "empty").mkdir()
    config = _tiny_config()
    config.data.source = str(tmp_path / "empty")
    with pytest.raises(checks.TrainConfigError, match="is an empty folder"):
        loop.train_and_evaluate(config, tmp_path / "workdir")


def test_resuming_with_another_architecture_names_the_fields(tmp_path):
    from sdjax.train import checks

    config = _tiny_config()
    (tmp_path / "train_config.json").write_text(config.to_json_best_effort())
    changed = _tiny_config()
    changed.vae.layers_per_block = 2
    changed.steps = config.steps + 10  # training-only: allowed
    with pytest.raises(checks.TrainConfigError, match="vae.layers_per_block differ"):
        checks.check_same_model(changed, tmp_path)
    longer = _tiny_config()
    longer.steps = config.steps + 10
    checks.check_same_model(longer, tmp_path)  # no error


def test_a_file_as_workdir_is_refused(tmp_path):
    from sdjax.train import checks, loop

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(checks.TrainConfigError, match="notes.txt is a file; pass a folder"):
        loop.train_and_evaluate(_tiny_config(), tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


TRAIN_CLI_CASES = [
    (["--config=configs/shapes64_vae.py:tiny", "--config.optim.lrr=0.1"], "unknown config field 'optim.lrr'.*optim.lr"),
    (["--config=configs/no_such_config.py"], "cannot load the --config file: .*No such file"),
    (["--config=configs/shapes64_vae.py:huge"], "unknown config arg 'huge'; accepted: tiny"),
]


@pytest.mark.parametrize("args, message", TRAIN_CLI_CASES, ids=[m[:30] for _, m in TRAIN_CLI_CASES])
def test_train_cli_config_mistakes_are_one_line(tmp_path, args, message):
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "train.py", f"--workdir={tmp_path / 'w'}", *args], cwd=root, capture_output=True, text=True
    )
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: ") and re.search(message, last), last
    assert "Traceback" not in out.stderr and not (tmp_path / "w").exists()


def test_distributed_cluster_is_read_from_the_documented_variables(monkeypatch):
    import train

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert train._cluster_from_env() == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(SystemExit, match="must be integers"):
        train._cluster_from_env()
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    assert train._cluster_from_env() == {}  # left to JAX's own detection (Cloud TPU, SLURM)
