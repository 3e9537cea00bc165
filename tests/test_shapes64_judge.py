"""Specification of sdjax.shapes64.judge: reading colour, shape and background off shapes64 images."""

import itertools
import subprocess
import sys

import numpy as np
import pytest

from sdjax.shapes64 import judge as J
from sdjax.shapes64 import prompts as P
from sdjax.shapes64 import scene as S

COMBOS = [(c, s, b) for c, s, b in itertools.product(S.COLORS, S.SHAPES, S.COLORS) if c != b]


def _random_scenes(n: int, seed: int):
    """n scenes cycling through every (colour, shape, background), sizes cycling through 24..44."""
    rng = np.random.default_rng(seed)
    sizes = list(range(S.MIN_SIZE, S.MAX_SIZE + 1))
    for i in range(n):
        color, shape, background = COMBOS[i % len(COMBOS)]
        size = sizes[i % len(sizes)]
        cx, cy = rng.uniform(size / 2, S.IMAGE_SIZE - size / 2, size=2)
        yield {"color": color, "shape": shape, "background": background, "cx": cx, "cy": cy, "size": size}


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
    taps /= taps.sum()
    out = np.pad(image.astype(np.float32), ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    out = sum(t * out[i : i + h] for i, t in enumerate(taps))
    return sum(t * out[:, i : i + w] for i, t in enumerate(taps))


def _truth(scene):
    return {k: scene[k] for k in ("color", "shape", "background")}


def test_judges_1000_ground_truth_renders_perfectly():
    wrong = [s for s in _random_scenes(1000, seed=0) if J.judge(S.render(**s)) != _truth(s)]
    assert wrong == []


def test_judges_the_smallest_and_largest_shapes_in_the_corners():
    for (color, shape, background), size in itertools.product(COMBOS, (S.MIN_SIZE, S.MAX_SIZE)):
        for c in (size / 2, S.IMAGE_SIZE - size / 2):
            image = S.render(color, shape, background, c, S.IMAGE_SIZE - c, size)
            assert J.judge(image) == {"color": color, "shape": shape, "background": background}


def test_is_robust_to_gaussian_noise_and_a_small_blur():
    rng = np.random.default_rng(1)
    scenes = list(_random_scenes(1000, seed=2))
    hits = 0
    for scene in scenes:
        image = _gaussian_blur(S.render(**scene), sigma=0.8) + rng.normal(0, 10, (64, 64, 3))
        hits += J.judge(np.clip(np.round(image), 0, 255).astype(np.uint8)) == _truth(scene)
    assert hits / len(scenes) >= 0.98


def test_accepts_float_images_in_the_unit_range():
    image = S.render("blue", "triangle", "yellow", 30, 34, 30).astype(np.float32) / 255
    assert J.judge(image) == {"color": "blue", "shape": "triangle", "background": "yellow"}


def test_works_at_other_resolutions():
    for shape in S.SHAPES:
        image = S.render("green", shape, "black", 70, 60, 80, image_size=128)
        assert J.judge(image) == {"color": "green", "shape": shape, "background": "black"}


def test_a_plain_image_has_no_colour_or_shape():
    image = np.full((64, 64, 3), S.PALETTE["white"], np.uint8)
    assert J.judge(image) == {"color": None, "shape": None, "background": "white"}


def test_slightly_off_palette_colours_map_to_the_nearest_palette_colour():
    image = S.render("red", "square", "white", 32, 32, 30).astype(np.int16)
    image += np.array([-25, 20, 15], np.int16)  # a model's colour drift
    result = J.judge(np.clip(image, 0, 255).astype(np.uint8))
    assert result == {"color": "red", "shape": "square", "background": "white"}


@pytest.mark.parametrize(
    "image",
    [np.zeros((64, 64), np.uint8), np.zeros((64, 64, 4), np.uint8), np.full((64, 64, 3), 2.0), np.zeros((4, 4, 3))],
)
def test_rejects_images_it_cannot_read(image):
    with pytest.raises(ValueError):
        J.judge(image)


def test_parse_caption_inverts_the_caption_template():
    for color, shape, background in COMBOS:
        caption = S.caption(color, shape, background)
        assert J.parse_caption(caption) == {"color": color, "shape": shape, "background": background}


@pytest.mark.parametrize(
    "caption", ["a red circle", "a purple circle on a red background", "a red cube on a blue background"]
)
def test_parse_caption_rejects_other_sentences(caption):
    with pytest.raises(ValueError, match="caption"):
        J.parse_caption(caption)


def test_accuracy_counts_matches_per_attribute():
    images = np.stack([S.render("red", "circle", "white", 32, 32, 30), S.render("blue", "square", "black", 32, 32, 30)])
    captions = ["a red circle on a white background", "a blue triangle on a black background"]
    assert J.accuracy(images, captions) == {"color": 1.0, "shape": 0.5, "background": 1.0, "all": 0.5}


def test_the_judge_and_the_scenes_import_no_tensorflow():
    code = "import sys, sdjax.shapes64, sdjax.shapes64.judge; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _caption_fields(prompts):
    return [J.parse_caption(p) for p in prompts]


@pytest.mark.parametrize("prompt_set", [P.tuning_prompts, P.heldout_prompts])
def test_each_prompt_set_has_every_colour_as_foreground_and_background_with_every_shape(prompt_set):
    fields = _caption_fields(prompt_set())
    assert len(fields) >= 30 and len({tuple(f.values()) for f in fields}) == len(fields)
    for role in ("color", "background"):
        for color in S.COLORS:
            assert {f["shape"] for f in fields if f[role] == color} == set(S.SHAPES), (role, color)


def test_heldout_prompts_are_disjoint_from_the_tuning_prompts():
    assert not set(P.heldout_prompts()) & set(P.tuning_prompts())
    assert J.eval_prompts() == P.tuning_prompts()


# ----------------------------------------------------------------------------------------- the strict analyser


def _tilted_ellipse(color, background, semi_axes, degrees):
    """An ellipse centred in the image, its axes turned by `degrees` (what a model draws for a circle)."""
    y, x = np.mgrid[0:64, 0:64] + 0.5 - 32
    t = np.deg2rad(degrees)
    u, v = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
    inside = ((u / semi_axes[0]) ** 2 + (v / semi_axes[1]) ** 2 <= 1)[..., None]
    return np.where(inside, S.PALETTE[color], S.PALETTE[background]).astype(np.uint8)


def test_ground_truth_renders_are_all_crisp_with_their_fitted_centre_and_size():
    scenes = list(_random_scenes(90, seed=3))
    images = np.stack([S.render(**s) for s in scenes])
    report = J.crisp_report(images, [S.caption(s["color"], s["shape"], s["background"]) for s in scenes])
    assert report["crisp"] == report["color"] == report["background"] == 1.0 and report["iou"]["p10"] >= 0.97
    assert all(row["images"] == 30 and row["crisp"] == 1.0 for row in report["shapes"].values())
    for scene, image in zip(scenes[:20], images[:20], strict=True):
        result = J.analyse(image, scene["shape"])
        assert result["iou"] >= 0.95 and result["flatness"] == 1.0, (scene, result)
        assert np.allclose(result["fit"], (scene["cx"], scene["cy"], scene["size"]), atol=1.0), (scene, result)


def test_an_oblong_circle_passes_the_lenient_judge_but_is_not_crisp():
    for semi_axes, degrees in (((18, 14), 30), ((19, 14), 0), ((18, 13), 45)):
        image = _tilted_ellipse("red", "white", semi_axes, degrees)
        assert J.judge(image)["shape"] == "circle" and J.analyse(image, "circle")["iou"] < J.CRISP_IOU


def test_a_rectangle_is_not_a_crisp_square():
    image = np.full((64, 64, 3), S.PALETTE["black"], np.uint8)
    image[14:50, 20:44] = S.PALETTE["yellow"]  # 24 wide, 36 high
    assert J.judge(image)["shape"] == "square" and not J.analyse(image, "square")["crisp"]


def test_a_shape_of_another_kind_is_not_crisp():
    image = S.render("blue", "triangle", "white", 32, 32, 40)
    assert J.analyse(image, "triangle")["crisp"]
    assert not J.analyse(image, "circle")["crisp"] and not J.analyse(image, "square")["crisp"]


def test_a_shading_inside_the_shape_is_not_flat():
    image = S.render("red", "square", "white", 32, 32, 40).astype(np.float32)
    inside = S.coverage("square", 32, 32, 40)[..., None]
    shade = np.linspace(-70, 70, 64)[None, :, None]  # a left-to-right gradient on the shape only
    shaded = np.clip(image + inside * shade, 0, 255).astype(np.uint8)
    result = J.analyse(shaded, "square")
    assert result["iou"] >= 0.9 and result["flatness"] < J.CRISP_FLATNESS and not result["crisp"]
    assert result["spread"] > 20 > J.analyse(image.astype(np.uint8), "square")["spread"]


def test_an_empty_image_has_iou_zero_and_is_not_crisp():
    result = J.analyse(np.full((64, 64, 3), S.PALETTE["green"], np.uint8), "circle")
    assert result["iou"] == 0.0 and not result["crisp"] and result["fit"] is None


def test_the_strict_analyser_rejects_unknown_shapes():
    with pytest.raises(ValueError, match="shape"):
        J.analyse(S.render("red", "circle", "white", 32, 32, 30), "diamond")


def test_format_report_has_a_row_per_shape_and_one_for_all():
    scenes = list(_random_scenes(90, seed=5))[::10]  # every shape
    images = np.stack([S.render(**s) for s in scenes])
    table = J.format_report(
        J.crisp_report(images, [S.caption(s["color"], s["shape"], s["background"]) for s in scenes])
    )
    rows = table.splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == [*S.SHAPES, "all"]
    assert all("100.0%" in r for r in rows)
