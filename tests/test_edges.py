"""sdjax.edges.canny on rendered shapes64 scenes: edges lie on the shape's outline, one pixel thin, and nowhere
inside the flat regions; thresholds and inputs behave as cv2.Canny's."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from sdjax.edges import canny
from sdjax.errors import PipelineError
from sdjax.shapes64.scene import coverage, render

SCENES = [
    ("red", "circle", "blue", 32, 32, 36),  # equal brightness: the edge is in the colour channels only
    ("yellow", "square", "black", 30.5, 33.5, 30),
    ("green", "triangle", "white", 33, 31, 40),
]


def _outline(shape: str, cx: float, cy: float, size: float) -> np.ndarray:
    """bool (64, 64): pixels of the shape (>= half covered) with a 4-neighbour outside it, and vice versa."""
    inside = coverage(shape, cx, cy, size) >= 0.5
    return inside ^ ndimage.binary_erosion(inside, border_value=1) | ~inside & ndimage.binary_dilation(inside)


@pytest.mark.parametrize("scene", SCENES, ids=[s[1] for s in SCENES])
def test_edges_lie_on_the_outline_and_nowhere_in_flat_regions(scene):
    color, shape, background, cx, cy, size = scene
    edges = canny(render(*scene))[..., 0] > 0
    outline = _outline(shape, cx, cy, size)
    near_outline = ndimage.binary_dilation(outline, iterations=1)
    assert not (edges & ~near_outline).any(), "edge pixels inside a flat region"
    found = (outline & ndimage.binary_dilation(edges, structure=np.ones((3, 3)))).sum() / outline.sum()
    assert found >= 0.95, f"only {found:.0%} of the outline has an edge within a pixel"
    assert edges.sum() <= 0.75 * outline.sum(), "edges are not thinned to one pixel"  # the outline is two thick


def test_output_is_a_white_on_black_rgb_control_image():
    edges = canny(render(*SCENES[0]))
    assert edges.shape == (64, 64, 3) and edges.dtype == np.uint8
    assert set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 0] == edges[..., 2]).all()


def test_a_flat_image_has_no_edges():
    assert not canny(np.full((32, 48, 3), 128, np.uint8)).any()


def test_float_gray_path_and_pil_inputs_read_as_the_same_pixels(tmp_path):
    image = render(*SCENES[1])
    expected = canny(image)
    np.testing.assert_array_equal(canny(image.astype(np.float32) / 255.0), expected)
    np.testing.assert_array_equal(canny(Image.fromarray(image)), expected)
    Image.fromarray(image).save(tmp_path / "scene.png")
    np.testing.assert_array_equal(canny(tmp_path / "scene.png"), expected)
    gray = image.mean(axis=-1).astype(np.uint8)
    np.testing.assert_array_equal(canny(gray), canny(np.repeat(gray[..., None], 3, axis=-1)))


def test_higher_thresholds_keep_fewer_edges():
    image = render(*SCENES[2])
    counts = [int(canny(image, low, high).sum()) for low, high in ((50, 100), (100, 200), (400, 800), (5000, 6000))]
    assert counts[0] >= counts[1] >= counts[2] >= counts[3] == 0
    assert counts[1] > 0


@pytest.mark.parametrize(
    "image, kwargs, message",
    [
        (np.zeros((8, 8, 3), np.uint8), {"low": 200, "high": 100}, "0 <= low <= high"),
        (np.zeros((8, 8, 4), np.uint8), {}, r"\(H, W\), \(H, W, 1\) or \(H, W, 3\)"),
        (np.full((8, 8), 2.0), {}, "float images in \\[0, 1\\]"),
    ],
    ids=["thresholds", "rgba_array", "float_range"],
)
def test_bad_input_is_one_line(image, kwargs, message):
    with pytest.raises(PipelineError, match=message):
        canny(image, **kwargs)
