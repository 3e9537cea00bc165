"""Specification of sdjax.data and sdjax.shapes64: the shapes64 scenes and TFDS builder, the image-folder builder,
the data sources and the tf.data input pipeline."""

import json
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from sdjax import tokenizer as T
from sdjax.data import imagefolder as F
from sdjax.data import input_pipeline as P
from sdjax.data import sources
from sdjax.shapes64 import dataset as D
from sdjax.shapes64 import scene as S

CAPTIONS = S.captions()
SINGLE_HOST = {"process_index": 0, "process_count": 1}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return T.build_tokenizer(CAPTIONS, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    builder = D.Shapes64(data_dir=tmp_path_factory.mktemp("tfds"), num_train=200, num_validation=20, seed=0)
    builder.download_and_prepare()
    return builder


def _raw_source(builder, split="train"):
    return builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})


def _make(source, tok, **kwargs):
    args = {"resolution": 64, "global_batch_size": 8, "num_devices": 2, "seed": 0, **SINGLE_HOST, **kwargs}
    return P.make_dataset(source, tokenizer=tok, **args)


def _take(pipeline, n):
    with pipeline:
        return [next(pipeline) for _ in range(n)]


def _save(path, array):
    Image.fromarray(array).save(path)


# ----------------------------------------------------------------------------------------------- shapes64


def test_tensorflow_sees_no_accelerators():
    assert {d.device_type for d in tf.config.get_visible_devices()} == {"CPU"}


def test_render_is_deterministic_uint8_64x64():
    a = S.render("red", "circle", "white", 30.3, 33.7, 31)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, S.render("red", "circle", "white", 30.3, 33.7, 31))


def test_render_paints_foreground_inside_and_background_outside():
    for shape in S.SHAPES:
        image = S.render("blue", shape, "yellow", 32, 32, 30)
        assert tuple(image[36, 32]) == S.PALETTE["blue"]
        assert tuple(image[0, 0]) == tuple(image[63, 63]) == S.PALETTE["yellow"]


def test_square_fills_its_box_and_circle_fills_pi_over_4_and_triangle_half():
    areas = {s: S.coverage(s, 32, 32, 40).sum() / 40**2 for s in S.SHAPES}
    assert areas["square"] == pytest.approx(1.0, abs=1e-6)
    assert areas["circle"] == pytest.approx(np.pi / 4, abs=0.01)
    assert areas["triangle"] == pytest.approx(0.5, abs=0.01)


def test_triangle_has_its_apex_up_and_base_horizontal():
    alpha = S.coverage("triangle", 32, 32, 40)
    widths = alpha.sum(axis=1)
    assert widths[14] < widths[30] < widths[50] and widths[50] == pytest.approx(38, abs=1)


def test_render_rejects_bad_scenes():
    with pytest.raises(ValueError, match="accepted"):
        S.render("purple", "circle", "white", 32, 32, 30)
    with pytest.raises(ValueError, match="accepted"):
        S.render("red", "star", "white", 32, 32, 30)
    with pytest.raises(ValueError, match="must differ"):
        S.render("red", "circle", "red", 32, 32, 30)
    with pytest.raises(ValueError, match="inside"):
        S.render("red", "circle", "white", 10, 32, 30)


def test_sampled_scenes_follow_the_dataset_rules():
    rng = np.random.default_rng(0)
    scenes = [S.sample_scene(rng) for _ in range(3000)]
    assert all(s["color"] != s["background"] for s in scenes)
    assert {s["size"] for s in scenes} == set(range(24, 45))
    assert all(s["size"] / 2 <= min(s["cx"], s["cy"], 64 - s["cx"], 64 - s["cy"]) for s in scenes)
    assert {(s["color"], s["shape"], s["background"]) for s in scenes} == {
        (c, s, b) for c in S.COLORS for s in S.SHAPES for b in S.COLORS if b != c
    }


def test_captions_lists_every_caption_examples_can_have_once():
    assert len(CAPTIONS) == len(set(CAPTIONS)) == 6 * 3 * 5
    assert {S.example(0, "train", i)["caption"] for i in range(2000)} == set(CAPTIONS)


def test_builder_keeps_the_name_version_and_config_names_of_prepared_data(tmp_path):
    builder = D.Shapes64(data_dir=tmp_path, num_train=200, num_validation=20)
    assert (builder.name, str(builder.version), builder.builder_config.name) == (
        "shapes64",
        "1.0.0",
        "train200_val20_seed0",
    )
    assert D.DEFAULT_CONFIG.name == "train50000_val2000_seed0"


def test_default_config_has_50k_train_and_2k_validation(tmp_path):
    assert (D.DEFAULT_CONFIG.num_train, D.DEFAULT_CONFIG.num_validation) == (50_000, 2_000)
    assert D.Shapes64(data_dir=tmp_path).builder_config is D.DEFAULT_CONFIG


def test_builder_makes_the_configured_split_sizes(shapes):
    assert shapes.info.splits["train"].num_examples == 200
    assert shapes.info.splits["validation"].num_examples == 20


def test_builder_examples_are_the_seeded_renders_with_matching_caption_and_labels(shapes):
    generated = {}
    for i in range(200):
        ex = S.example(0, "train", i)
        generated[ex["image"].tobytes()] = ex["caption"]
    labels = shapes.info.features
    rows = list(shapes.as_data_source("train"))
    for row in rows:
        names = {k: labels[k].int2str(row[k]) for k in ("color", "shape", "background")}
        assert generated[row["image"].tobytes()] == row["caption"].decode() == S.caption(**names)
    assert len({row["image"].tobytes() for row in rows}) == 200


def test_same_seed_builds_identical_data_and_another_seed_differs(tmp_path):
    def build(data_dir, seed):
        builder = D.Shapes64(data_dir=data_dir, num_train=20, num_validation=5, seed=seed)
        builder.download_and_prepare()
        return [row["image"] for row in _raw_source(builder)]

    first = build(tmp_path / "a", 0)
    assert build(tmp_path / "b", 0) == first
    assert build(tmp_path / "c", 1) != first


def test_train_and_validation_hold_different_examples():
    train = {S.example(0, "train", i)["caption"] + str(S.example(0, "train", i)["image"].sum()) for i in range(50)}
    val = {
        S.example(0, "validation", i)["caption"] + str(S.example(0, "validation", i)["image"].sum()) for i in range(50)
    }
    assert not train & val


@pytest.mark.slow
def test_building_the_default_50k_dataset_takes_under_two_minutes(tmp_path):
    start = time.perf_counter()
    D.Shapes64(data_dir=tmp_path).download_and_prepare()
    assert time.perf_counter() - start < 120


# ----------------------------------------------------------------------------------------------- sources


def test_a_named_source_with_num_train_gets_a_tenth_as_many_validation_examples(tmp_path):
    config = sources.builder("shapes64", data_dir=tmp_path, num_train=256).builder_config
    assert (config.num_train, config.num_validation, config.seed) == (256, 25, 0)
    assert sources.builder("shapes64", num_train=5).builder_config.num_validation == 1


def test_a_named_source_option_set_to_none_means_the_builder_default(tmp_path):
    assert sources.builder("shapes64", data_dir=tmp_path, num_train=None).builder_config is D.DEFAULT_CONFIG


def test_an_unknown_option_of_a_named_source_raises_a_clear_error():
    with pytest.raises(ValueError, match="no option seed; its options: num_train"):
        sources.builder("shapes64", seed=3)


def test_options_for_a_source_that_is_not_named_are_ignored_with_a_warning(shapes, tmp_path):
    with pytest.warns(UserWarning, match="apply only to named sources"):
        assert sources.builder(shapes, num_train=10) is shapes


def test_a_builder_instance_is_its_own_source(shapes):
    assert sources.builder(shapes) is shapes


def test_a_source_of_another_type_raises_a_clear_error():
    with pytest.raises(ValueError, match="source must be a named source"):
        sources.builder(42)


def test_captions_of_a_named_synthetic_source_and_none_for_others(tmp_path):
    assert sources.captions("shapes64") == CAPTIONS
    assert sources.captions(str(tmp_path)) is None
    assert sources.captions("mnist") is None


def test_make_dataset_passes_source_options_to_the_named_source(tok, tmp_path):
    pipeline = _make("shapes64", tok, data_dir=tmp_path, source_options={"num_train": 16})
    assert pipeline.num_examples == 16
    pipeline.close()


# ----------------------------------------------------------------------------------------------- imagefolder


@pytest.fixture
def folder(tmp_path):
    """Three valid images of different sizes (captions in metadata.jsonl) and one corrupt file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "pictures"
    root.mkdir()
    rows = []
    for i, (h, w) in enumerate([(64, 96), (80, 64), (64, 64)]):
        _save(root / f"img{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        rows.append({"file_name": f"img{i}.png", "text": f"picture number {i}"})
    (root / "broken.jpg").write_bytes(b"this is not a jpeg")
    rows.append({"file_name": "broken.jpg", "text": "broken"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_imagefolder_reads_captions_from_metadata_jsonl(folder, tmp_path):
    builder = F.CaptionedImageFolder(folder=folder, data_dir=tmp_path / "tfds")
    builder.download_and_prepare()
    rows = {r["file_name"].decode(): r for r in _raw_source(builder)}
    assert set(rows) == {"img0.png", "img1.png", "img2.png", "broken.jpg"}
    assert rows["img1.png"]["caption"] == b"picture number 1"
    assert rows["img1.png"]["image"] == (folder / "img1.png").read_bytes()


def test_imagefolder_reads_captions_from_txt_files_beside_images(tmp_path):
    _save(tmp_path / "a.jpg", np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "a.txt").write_text("a black square\n")
    assert F.captioned_images(str(tmp_path)) == [("a.jpg", "a black square")]


def test_imagefolder_leaves_out_uncaptioned_images_with_a_warning(tmp_path):
    for name in ("a.png", "b.png"):
        _save(tmp_path / name, np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "a.txt").write_text("only a")
    with pytest.warns(UserWarning, match="1 images .* no caption"):
        assert F.captioned_images(str(tmp_path)) == [("a.png", "only a")]


def test_imagefolder_split_subfolders_become_splits(tmp_path):
    for split in ("train", "validation"):
        (tmp_path / split).mkdir()
        _save(tmp_path / split / "x.png", np.zeros((8, 8, 3), np.uint8))
        (tmp_path / split / "x.txt").write_text(split)
    assert set(F.find_splits(str(tmp_path))) == {"train", "validation"}


def test_imagefolder_without_images_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="no images"):
        F.captioned_images(str(tmp_path))


def test_imagefolder_without_captions_raises(tmp_path):
    _save(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no captions"):
        F.captioned_images(str(tmp_path))


def test_imagefolder_with_malformed_metadata_names_the_line(tmp_path):
    _save(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(ValueError, match="metadata.jsonl:1"):
        F.captioned_images(str(tmp_path))


def test_imagefolder_missing_folder_raises(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        F.CaptionedImageFolder(folder=tmp_path / "missing", data_dir=tmp_path)


def test_changing_the_images_changes_the_config_but_building_inside_the_folder_does_not(folder):
    before = F.make_config(folder).name
    F.CaptionedImageFolder(folder=folder, data_dir=folder / "tfds").download_and_prepare()
    assert F.make_config(folder).name == before
    (folder / "img2.png").unlink()
    assert F.make_config(folder).name != before


# ----------------------------------------------------------------------------------------------- pipeline


def test_batches_have_device_and_batch_axes(shapes, tok):
    (batch,) = _take(_make(shapes, tok), 1)
    assert set(batch) == {"image", "input_ids"}
    assert batch["image"].shape == (2, 4, 64, 64, 3) and batch["image"].dtype == np.float32
    assert batch["input_ids"].shape == (2, 4, 77) and batch["input_ids"].dtype == np.int32


def test_batches_hold_the_shuffled_examples_scaled_to_minus_one_one(shapes, tok):
    batches = _take(_make(shapes, tok, seed=5), 3)
    source = _raw_source(shapes)
    indices = P.example_indices(np.arange(16, 24), 200, seed=5)
    rows = [source[int(i)] for i in indices]
    expected = np.stack([tf.io.decode_png(r["image"]).numpy() for r in rows]) / 127.5 - 1
    np.testing.assert_allclose(batches[2]["image"].reshape(8, 64, 64, 3), expected, atol=1e-6)
    expected_ids = T.tokenize(tok, [r["caption"].decode() for r in rows])
    np.testing.assert_array_equal(batches[2]["input_ids"].reshape(8, 77), expected_ids)


def test_every_epoch_is_a_new_permutation_of_the_split():
    order = P.example_indices(np.arange(60), 20, seed=3)
    epochs = order.reshape(3, 20)
    assert all(sorted(e) == list(range(20)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_the_order_depends_on_the_seed():
    assert not np.array_equal(P.example_indices(np.arange(20), 20, 0), P.example_indices(np.arange(20), 20, 1))


def test_start_step_resumes_exactly_with_all_augmentations(shapes, tok):
    aug = {"resolution": 48, "random_crop": True, "random_flip": True, "caption_dropout": 0.3, "seed": 7}
    full = _take(_make(shapes, tok, **aug), 30)
    resumed = _take(_make(shapes, tok, start_step=26, **aug), 4)
    for a, b in zip(full[26:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_tfrecord_datasets_give_the_same_batches_through_memory(shapes, tok, tmp_path):
    tfrecord = D.Shapes64(data_dir=tmp_path, num_train=200, num_validation=20, file_format="tfrecord")
    with pytest.warns(UserWarning, match="cannot be read by index"):
        from_memory = _take(_make(tfrecord, tok, random_flip=True), 2)
    by_index = _take(_make(shapes, tok, random_flip=True), 2)
    for a, b in zip(from_memory, by_index, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_same_arguments_give_the_same_stream(shapes, tok):
    a, b = (_take(_make(shapes, tok, random_flip=True, seed=2), 3) for _ in range(2))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_hosts_split_each_global_batch_between_them(shapes, tok):
    (single,) = _take(_make(shapes, tok, num_devices=2, random_flip=True), 1)
    hosts = [
        _take(_make(shapes, tok, num_devices=1, random_flip=True, process_index=h, process_count=2), 1)[0]
        for h in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in hosts]), single["image"])
    np.testing.assert_array_equal(np.concatenate([h["input_ids"] for h in hosts]), single["input_ids"])


def test_random_flip_mirrors_about_half_of_the_images(shapes, tok):
    plain = np.concatenate([b["image"].reshape(8, 64, 64, 3) for b in _take(_make(shapes, tok), 8)])
    flipped = np.concatenate([b["image"].reshape(8, 64, 64, 3) for b in _take(_make(shapes, tok, random_flip=True), 8)])
    pairs = list(zip(flipped, plain, strict=True))
    mirrored = np.array([np.array_equal(f, p[:, ::-1]) and not np.array_equal(f, p) for f, p in pairs])
    unchanged = np.array([np.array_equal(f, p) for f, p in pairs])
    assert (mirrored | unchanged).all() and 0.3 < mirrored.mean() < 0.7


def test_caption_dropout_empties_about_p_of_the_captions(shapes, tok):
    batches = _take(_make(shapes, tok, caption_dropout=0.5), 16)
    ids = np.concatenate([b["input_ids"].reshape(8, 77) for b in batches])
    empty = T.tokenize(tok, [""])[0]
    dropped = (ids == empty).all(axis=1)
    assert 0.35 < dropped.mean() < 0.65


def test_shorter_side_is_resized_then_centre_cropped(tmp_path, tok):
    image = np.zeros((32, 48, 3), np.uint8)
    image[:, 16:32] = 255  # a white band in the middle third
    _save(tmp_path / "wide.png", image)
    (tmp_path / "wide.txt").write_text("wide")
    (batch,) = _take(_make(tmp_path, tok, resolution=16, global_batch_size=1, num_devices=1, data_dir=tmp_path), 1)
    out = batch["image"][0, 0]
    assert out.shape == (16, 16, 3)
    # 32x48 -> 16x24 (antialiased: the band [16, 32) becomes [8, 16) with soft edges), then the centre 16 of
    # the 24 columns: [4, 20), so the band sits in the middle with 3 black columns on each side.
    row = np.round((out[0, :, 0] + 1) * 127.5).astype(int).tolist()
    assert row == [0, 0, 0, 32, 223, 255, 255, 255, 255, 255, 255, 223, 32, 0, 0, 0]
    np.testing.assert_allclose(out, np.broadcast_to(out[:1], out.shape), atol=1e-5)


def test_random_crops_are_windows_of_the_image(tmp_path, tok):
    ramp = np.tile(np.arange(0, 240, 5, dtype=np.uint8)[None, :, None], (32, 1, 3))  # column x has value 5x
    _save(tmp_path / "ramp.png", ramp)
    (tmp_path / "ramp.txt").write_text("ramp")
    pipeline = _make(tmp_path, tok, resolution=32, global_batch_size=1, num_devices=1, random_crop=True)
    offsets = set()
    for batch in _take(pipeline, 12):
        crop = batch["image"][0, 0]
        offset = round((crop[0, 0, 0] + 1) * 127.5 / 5)
        np.testing.assert_allclose(crop, ramp[:, offset : offset + 32] / 127.5 - 1, atol=1e-6)
        offsets.add(offset)
    assert len(offsets) > 3 and max(offsets) <= 16


def test_corrupt_images_are_skipped_counted_and_batches_stay_full(folder, tok, tmp_path):
    pipeline = _make(folder, tok, resolution=32, global_batch_size=4, num_devices=1, data_dir=tmp_path / "tfds")
    batches = _take(pipeline, 10)
    builder = F.CaptionedImageFolder(folder=folder, data_dir=tmp_path / "tfds")
    names = [_raw_source(builder)[int(i)]["file_name"] for i in P.example_indices(np.arange(40), 4, seed=0)]
    assert pipeline.num_corrupt_skipped == names.count(b"broken.jpg") == 10
    assert all(b["image"].shape == (1, 4, 32, 32, 3) and np.isfinite(b["image"]).all() for b in batches)
    broken_ids = T.tokenize(tok, ["broken"])[0]
    assert not any((b["input_ids"][0] == broken_ids).all(axis=1).any() for b in batches)


def test_resuming_is_exact_even_with_corrupt_images(folder, tok, tmp_path):
    args = {"resolution": 32, "global_batch_size": 4, "num_devices": 1, "data_dir": tmp_path / "tfds"}
    full = _take(_make(folder, tok, random_crop=True, **args), 9)
    resumed = _take(_make(folder, tok, random_crop=True, start_step=5, **args), 4)
    for a, b in zip(full[5:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_a_dataset_of_only_corrupt_images_stops_with_an_error(tmp_path, tok):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"garbage")
        (tmp_path / name.replace(".png", ".txt")).write_text("x")
    pipeline = _make(tmp_path, tok, resolution=16, global_batch_size=2, num_devices=1, data_dir=tmp_path / "tfds")
    with (
        pipeline,
        pytest.warns(UserWarning, match="undecodable"),
        pytest.raises(ValueError, match="could not be decoded"),
    ):
        for _ in range(10):
            next(pipeline)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"global_batch_size": 8, "per_device_batch": 4}, "exactly one"),
        ({"global_batch_size": 6}, "multiple of the 4 devices"),
        ({"caption_dropout": 1.5}, "probability"),
        ({"start_step": -1}, "start_step"),
        ({"split": "test"}, "no split 'test'"),
        ({"image_key": "picture"}, "no image feature 'picture'"),
        ({"caption_key": "text"}, "no text feature 'text'"),
    ],
)
def test_bad_arguments_raise_a_clear_error(shapes, tok, kwargs, message):
    args = {"resolution": 64, "num_devices": 4, **SINGLE_HOST, **kwargs}
    if "per_device_batch" not in kwargs and "global_batch_size" not in kwargs:
        args["global_batch_size"] = 8
    with pytest.raises(ValueError, match=message):
        P.make_dataset(shapes, tokenizer=tok, **args)


def test_unknown_source_raises_a_clear_error(tok, tmp_path):
    with pytest.raises(ValueError, match=r"not a named source \(shapes64\), an existing folder"):
        _make("no_such_dataset_xyz", tok, data_dir=tmp_path)
