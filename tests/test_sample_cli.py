"""sample.py end to end on a tiny diffusers folder: PNGs with metadata, a grid, timings, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import sample


def run(model, out, *extra):
    return sample.main(["--model", str(model), "--out", str(out), "--steps", "3", *extra])


def test_writes_one_png_per_image_with_metadata_and_a_grid(tiny_model, tmp_path, capsys):
    args = ["--prompt", "a red circle", "--prompt", "a green square", "--num-images", "2"]
    args += ["--negative-prompt", "blurry"]
    assert run(tiny_model, tmp_path, *args, "--seed", "4", "--sampler", "euler", "--guidance", "5") == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png"]
    info = Image.open(tmp_path / "0002.png").text
    assert info["prompt"] == "a green square" and info["negative_prompt"] == "blurry"
    assert (info["seed"], info["sampler"], info["steps"], info["guidance"]) == ("4", "euler", "3", "5.0")
    assert Image.open(tmp_path / "0000.png").size == (16, 16)
    assert "compile" in capsys.readouterr().out


def test_img2img_from_a_file(tiny_model, tmp_path):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "init.png")
    args = ["--prompt", "a red circle", "--init-image", str(tmp_path / "init.png"), "--strength", "0.5"]
    assert run(tiny_model, tmp_path / "out", *args) == 0
    assert Image.open(tmp_path / "out" / "0000.png").text["strength"] == "0.5"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--height", "15"], "multiples of 2"),
        (["--steps", "0"], "steps"),
        (["--init-image", "/nonexistent.png"], "cannot be read"),
    ],
)
def test_bad_input_prints_one_line_and_exits_2(tiny_model, tmp_path, capsys, extra, message):
    assert run(tiny_model, tmp_path, "--prompt", "a red circle", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not list(tmp_path.glob("*.png"))


def test_unknown_sampler_is_rejected_listing_choices(tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tiny_model, tmp_path, "--prompt", "x", "--sampler", "k_lms")
    assert "dpmpp_2m" in capsys.readouterr().err


def test_missing_model_path_is_one_line(tmp_path, capsys):
    assert sample.main(["--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sdxl_base_and_refiner_hand_off(tiny_sdxl, tiny_sdxl_refiner, tmp_path, capsys):
    (_, base), (_, refiner) = tiny_sdxl, tiny_sdxl_refiner
    args = ["--prompt", "a red circle", "--num-images", "2", "--refiner", str(refiner), "--high-noise-frac", "0.7"]
    assert run(base, tmp_path, *args, "--prompt-2", "blurry") == 0
    info = Image.open(tmp_path / "0001.png").text
    assert (info["sampler"], info["guidance"], info["high_noise_frac"]) == ("euler", "5.0", "0.7")
    assert info["refiner"] == str(refiner)
    alone = tmp_path / "alone"
    assert run(base, alone, "--prompt", "a red circle", "--num-images", "2") == 0
    with_refiner, without = (np.asarray(Image.open(d / "0001.png"), np.float32) for d in (tmp_path, alone))
    assert np.abs(with_refiner - without).max() > 10  # the refiner ran the last 30% on its own weights


def test_sdxl_flags_on_an_sd_model_are_one_line(tiny_model, tiny_sdxl_refiner, tmp_path, capsys):
    assert run(tiny_model, tmp_path, "--prompt", "x", "--refiner", str(tiny_sdxl_refiner[1])) == 2
    err = capsys.readouterr().err.strip()
    assert "--refiner applies to SDXL models" in err and "\n" not in err


def test_inpainting_from_files(tiny_model, tmp_path):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "init.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    args = [
        "--prompt",
        "a red circle",
        "--init-image",
        str(tmp_path / "init.png"),
        "--mask",
        str(tmp_path / "mask.png"),
    ]
    assert run(tiny_model, tmp_path / "out", *args) == 0
    info = Image.open(tmp_path / "out" / "0000.png").text
    assert info["mask"] == str(tmp_path / "mask.png") and info["strength"] == "default"


def test_two_controlnets_from_files(tiny_torch_pipe, tiny_model, tmp_path):
    from diffusers import ControlNetModel

    for i in range(2):
        torch_net = ControlNetModel.from_unet(tiny_torch_pipe.unet, conditioning_embedding_out_channels=(16, 32))
        torch_net.save_pretrained(tmp_path / f"cn{i}", safe_serialization=True)
        Image.new("RGB", (16, 16), (30 * i, 100, 200)).save(tmp_path / f"c{i}.png")
    args = ["--prompt", "a red circle", "--control-scale", "0.5", "--control-scale", "1.5"]
    for i in range(2):
        args += ["--controlnet", str(tmp_path / f"cn{i}"), "--control-image", str(tmp_path / f"c{i}.png")]
    assert run(tiny_model, tmp_path / "out", *args) == 0
    assert Image.open(tmp_path / "out" / "0000.png").text["control_scale"] == "[0.5, 1.5]"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mask", "m.png"], "--mask applies to inpainting the --init-image: pass --init-image FILE too"),
        (["--control-image", "c.png"], "--control-image applies to ControlNet guidance: pass --controlnet PATH too"),
        (
            ["--controlnet", "cn", "--control-image", "a.png", "--control-image", "b.png"],
            "got 2 --control-image for 1 --controlnet; pass one image per ControlNet",
        ),
        (
            ["--controlnet", "cn", "--control-image", "a.png", "--control-scale", "1", "--control-scale", "2"],
            "got 2 --control-scale for 1 --controlnet",
        ),
        (
            ["--controlnet", "cn", "--control-image", "/nonexistent.png"],
            "control image /nonexistent.png cannot be read",
        ),
        (["--init-image", "/nonexistent.png", "--mask", "m.png"], "init image /nonexistent.png cannot be read"),
    ],  # fmt: skip
)
def test_bad_task_flags_are_one_line_before_loading(tmp_path, capsys, extra, message):
    assert run(tmp_path / "no-model-needed", tmp_path / "out", "--prompt", "x", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
