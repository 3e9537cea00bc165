"""JAX's persistent compilation cache through sdjax.enable_compile_cache: a second process reads the sampling
program from disk, a different image size compiles anew, a corrupt entry does not break a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Counts JAX's cache events while generating one image; prints them as JSON.
SNIPPET = """
import json, sys
import jax
import sdjax
counts = {"hits": 0, "requests": 0}
def listener(event, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
        counts["hits"] += 1
    elif event == "/jax/compilation_cache/compile_requests_use_cache":
        counts["requests"] += 1
jax.monitoring.register_event_listener(listener)
folder = sdjax.enable_compile_cache()
pipe = sdjax.StableDiffusion.from_pretrained(sys.argv[1])
progress = sys.argv[3:] == ["progress"]
size = int(sys.argv[2])
images = pipe.generate(["a red circle"], num_inference_steps=3, height=size, width=size, progress=progress)
assert images.shape[1] == int(sys.argv[2])
import hashlib
digest = hashlib.sha256(images.tobytes()).hexdigest()
print(json.dumps({**counts, "folder": str(folder), "compile_s": pipe.last_timings["compile_s"], "images": digest}))
"""


def _run(model, cache, size=16, progress=False, **env):
    inherited = {k: v for k, v in os.environ.items() if k != "SDJAX_NO_COMPILE_CACHE"}  # conftest turns it off
    env = {**inherited, "SDJAX_CACHE_DIR": str(cache), "JAX_PLATFORMS": "cpu", **env}
    argv = [sys.executable, "-c", SNIPPET, str(model), str(size), *(["progress"] if progress else [])]
    out = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cache(tiny_model, tmp_path_factory):
    """A cache folder filled by one run at 16x16."""
    folder = tmp_path_factory.mktemp("cache")
    first = _run(tiny_model, folder)
    assert first["folder"] == str(folder) and first["hits"] == 0
    return folder


def test_second_process_reads_the_compiled_programs_from_the_cache(tiny_model, cache):
    assert any(cache.iterdir())
    second = _run(tiny_model, cache)
    assert second["requests"] > 0 and second["hits"] == second["requests"]  # nothing compiled again
    # ... nor traced: the sampling program and the networks' parameter shapes come from the trace cache.
    assert any((cache / "exported").iterdir()) and len(list((cache / "param_shapes").iterdir())) == 3


def test_cached_programs_give_the_images_of_a_fresh_compile(tiny_model, cache, tmp_path):
    assert _run(tiny_model, cache)["images"] == _run(tiny_model, tmp_path / "off", SDJAX_NO_COMPILE_CACHE="1")["images"]


def test_a_different_image_size_misses_the_cache(tiny_model, cache):
    other = _run(tiny_model, cache, size=24)
    assert other["hits"] < other["requests"]  # the sampling program for 24x24 is compiled, not read


def test_corrupt_cache_entries_do_not_break_a_run(tiny_model, cache, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for entry in cache.iterdir():
        if entry.is_file():
            (corrupt / entry.name).write_bytes(b"not a compiled program")
    assert _run(tiny_model, corrupt)["hits"] == 0


def test_cache_can_be_turned_off(tiny_model, tmp_path):
    result = _run(tiny_model, tmp_path / "cache", SDJAX_NO_COMPILE_CACHE="1")
    assert result["folder"] == "None" and result["hits"] == 0
    assert not (tmp_path / "cache").exists()


def test_a_progress_bar_run_is_read_from_the_cache_too(tiny_model, cache):
    # --progress steps through separately compiled programs (no host callback, which JAX never caches).
    first = _run(tiny_model, cache, progress=True)
    second = _run(tiny_model, cache, progress=True)
    assert first["hits"] < first["requests"] and second["requests"] > 0 and second["hits"] == second["requests"]
    assert second["images"] == first["images"] == _run(tiny_model, cache)["images"]  # the same images as without
