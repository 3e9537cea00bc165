"""python -m sdjax.export: a model -> a diffusers folder with float32 or float16 weights, all or nothing."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from sdjax import StableDiffusion, export
from sdjax.pipeline import PipelineError


def test_export_writes_float16_weights_that_reload(tiny_model, tiny_pipe, tmp_path):
    assert export.main([str(tiny_model), str(tmp_path / "half"), "--dtype", "float16"]) == 0
    half = StableDiffusion.from_pretrained(tmp_path / "half")
    for name in ("unet", "vae", "text_encoder"):
        a, b = jax.tree.leaves(tiny_pipe.params[name]), jax.tree.leaves(half.params[name])
        assert len(a) == len(b) and all(x.dtype == y.dtype == np.float32 for x, y in zip(a, b, strict=True))
        for x, y in zip(a, b, strict=True):  # exactly the float16 rounding of the original weights
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x).astype(np.float16).astype(np.float32))


def test_export_refuses_to_overwrite_and_leaves_nothing_half_written(tiny_model, tmp_path, capsys):
    shutil.copytree(tiny_model, tmp_path / "source")  # inside tmp_path, whose listing is checked
    (tmp_path / "taken").mkdir()
    assert export.main([str(tmp_path / "source"), str(tmp_path / "taken")]) == 2
    assert "exists" in capsys.readouterr().err and not list((tmp_path / "taken").iterdir())
    assert export.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source", "taken"]
    with pytest.raises(PipelineError, match="accepted: float32, float16"):
        export.export(tmp_path / "source", tmp_path / "out", dtype="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source", "taken"]
