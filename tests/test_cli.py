"""The command lines and the package as a newcomer meets them: --help that lists the options, errors in one line
(argparse's, train.py's, undecodable argv bytes), submodules reachable after `import sdjax`, no PyTorch notice
from sdjax's own imports, and a training run without the train extra told what to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import sample

ROOT = Path(__file__).resolve().parents[1]


def _python(*args: str | bytes, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # Without TRANSFORMERS_NO_ADVISORY_WARNINGS, which importing train.py in this process sets.
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------------------------------------ train.py


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_train_help_lists_the_flags_and_points_to_the_config_fields(flag, tmp_path):
    out = _python("train.py", flag, f"--workdir={tmp_path / 'w'}")
    assert out.returncode == 0, out.stderr
    assert "--workdir" in out.stdout and "--[no]compile_cache" in out.stdout and "--config.<field>" in out.stdout
    if flag == "--helpfull":
        assert "--[no]logtostderr" in out.stdout  # absl's own flags too
    assert not (tmp_path / "w").exists()


def test_train_help_with_a_config_lists_its_fields():
    out = _python("train.py", "--config=configs/shapes64_vae.py:tiny", "--help")
    assert out.returncode == 0, out.stderr
    assert "--config.steps=20" in out.stdout and "--config.optim.lr=" in out.stdout


def test_train_errors_are_printed_once(tmp_path):
    config = "--config=configs/shapes64_vae.py:tiny"
    out = _python("train.py", config, "--config.optim.lr=-1", f"--workdir={tmp_path}/w")
    assert out.returncode == 1
    mentions = [line for line in out.stderr.splitlines() if "optim.lr must be" in line]
    assert mentions == ["train.py: TrainConfigError: optim.lr must be a finite number > 0, got -1.0"], out.stderr
    assert not (tmp_path / "w").exists()


def test_train_without_the_train_extra_says_what_to_install(tmp_path):
    # sys.modules[name] = None is how Python spells "not installed" to importlib.util.find_spec.
    code = (
        "import runpy, sys; sys.modules['tensorflow'] = None; "
        f"sys.argv = ['train.py', '--config=configs/shapes64_vae.py:tiny', '--workdir={tmp_path}/w']; "
        "runpy.run_path('train.py', run_name='__main__')"
    )
    out = _python("-c", code)
    assert out.returncode == 1
    assert out.stderr.strip() == "train.py: training needs tensorflow (not installed): pip install -e '.[train]'"
    assert not (tmp_path / "w").exists()


def test_the_data_package_names_the_extra_when_tensorflow_is_missing():
    out = _python("-c", "import sys; sys.modules['tensorflow'] = None; import sdjax.data")
    assert out.returncode == 1 and "pip install -e '.[train]'" in out.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------ sample.py


def test_sample_help_gives_every_option_help_and_no_doubled_defaults():
    parser = sample.build_parser()
    undocumented = [a.option_strings for a in parser._actions if not a.help]
    assert not undocumented
    formatter = parser._get_formatter()
    helps = [formatter._get_help_string(a) for a in parser._actions]
    assert not [h for h in helps if h.count("(default:") > 1 or "(default: None)" in h]
    text = parser.format_help()
    # The SDXL example keeps its line break after the continuation backslash.
    assert "--refiner stable-diffusion-xl-refiner-1.0 \\\n        --high-noise-frac 0.8" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "x"], "error: the following arguments are required: --out (see --help)"),
        (["--prompt", "x", "--out", "o", "--steps", "many"], "error: argument --steps: invalid int value: 'many'"),
    ],
)
def test_sample_argparse_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(message)
    assert not list(tmp_path.iterdir())


def test_sample_refuses_undecodable_argv_bytes_in_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "sample.py", b"--prompt", b"a \xff\xfe circle", "--out", tmp_path / "o"],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=600,
    )
    err = out.stderr.decode("utf-8", "backslashreplace").strip()
    assert out.returncode == 2 and "\n" not in err
    assert err.startswith("error: --prompt is not valid text: '\\udcff' at character 2 is a lone surrogate")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ the package


def test_submodules_are_attributes_after_import_sdjax():
    code = """
import sys
import sdjax
assert "jax" not in sys.modules, "import sdjax alone must stay light"
assert sdjax.tokenizer.clip_tokenizer().vocab_size == 49408
assert callable(sdjax.weights.load_component) and callable(sdjax.schedule.ScheduleConfig)
assert callable(sdjax.shapes64.judge.evaluate) and sdjax.shapes64.MODEL_DIR.is_dir()
assert callable(sdjax.loading.lora.read_adapter) and sdjax.models.unet.UNet2DConditionModel
assert "images" in dir(sdjax) and "judge" not in dir(sdjax)
"""
    out = _python("-c", code)
    assert out.returncode == 0, out.stderr


def test_unknown_attributes_still_raise_attribute_error():
    import sdjax

    with pytest.raises(AttributeError, match="module 'sdjax' has no attribute 'nope'"):
        sdjax.nope  # noqa: B018
    with pytest.raises(AttributeError, match="module 'sdjax.shapes64' has no attribute 'nope'"):
        sdjax.shapes64.nope  # noqa: B018


def test_no_pytorch_notice_from_sdjax_imports():
    # As in an environment without PyTorch (sdjax needs none): transformers would log its "PyTorch was not found".
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import sdjax\n"
        "pipe = sdjax.StableDiffusion.from_pretrained(sdjax.shapes64.MODEL_DIR)\n"
        "import transformers; assert not transformers.is_torch_available()\n"
    )
    out = _python("-c", code)
    assert out.returncode == 0, out.stderr
    assert "PyTorch was not found" not in out.stderr
    control = _python("-c", "import sys; sys.modules['torch'] = None; import transformers")
    assert "PyTorch was not found" in control.stderr  # the notice this test would catch
