"""Test-session settings and fixtures shared by every test module."""

import hashlib
import os
from pathlib import Path

import pytest

# sample.main() and friends turn on sdjax's compilation cache; in-process tests must neither write the user's
# ~/.cache/sdjax nor change how later tests compile. tests/test_compile_cache.py runs its own processes with it on.
os.environ["SDJAX_NO_COMPILE_CACHE"] = "1"


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="session")
def _tiny_reference(tmp_path_factory):
    """(diffusers pipeline, its folder) of ``tests.reference.tiny_pipeline()``, built once per session; fails the
    session's teardown if any test changed a file of the folder."""
    from tests.reference import tiny_pipeline  # imports torch: only for the sessions that use the fixture

    folder = tmp_path_factory.mktemp("tiny_sd")
    torch_pipe = tiny_pipeline(folder)
    before = _digests(folder)
    yield torch_pipe, folder
    after = _digests(folder)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"a test changed the shared tiny_model folder (copy it first): {changed}"


@pytest.fixture(scope="session")
def tiny_model(_tiny_reference) -> Path:
    """Folder of the default tiny random-weight diffusers pipeline (SD1-style, epsilon), shared by the session.
    Read only: a test that writes into or changes a model folder copies this one first
    (``shutil.copytree(tiny_model, tmp_path / "model")``)."""
    return _tiny_reference[1]


@pytest.fixture(scope="session")
def tiny_torch_pipe(_tiny_reference):
    """The diffusers StableDiffusionPipeline saved as ``tiny_model``. Shared: do not change it (``copy.deepcopy``
    it first to swap its scheduler)."""
    return _tiny_reference[0]


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    """``sdjax.StableDiffusion.from_pretrained(tiny_model)``, shared by the session (its compiled programs too).
    Do not change it: a test that needs other weights loads its own."""
    import sdjax

    return sdjax.StableDiffusion.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """(diffusers StableDiffusionXLPipeline, its folder) of ``tests.reference.tiny_sdxl_pipeline()``, shared by
    the session. Read only, as ``tiny_model``."""
    from tests.reference import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("tiny_sdxl")
    return tiny_sdxl_pipeline(folder), folder


@pytest.fixture(scope="session")
def tiny_sdxl_refiner(tmp_path_factory):
    """(diffusers StableDiffusionXLImg2ImgPipeline, its folder): the tiny SDXL refiner, shared by the session."""
    from tests.reference import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("tiny_sdxl_refiner")
    return tiny_sdxl_pipeline(folder, refiner=True), folder
