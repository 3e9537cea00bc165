"""What a training run prints: no third-party banners or download wording for local data, a heartbeat while a
phase runs long, throughput without the compiling step, and a closing line with the command that uses the result."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from sdjax.train import monitor
from sdjax.train import workdir as workdir_lib
from tests import test_train
from tests.test_train import REPO, cache_env, load_config, logged_scalars

compilation_cache, data_dir = test_train.compilation_cache, test_train.data_dir

# What TensorFlow, absl and TFDS printed before (each line a pattern); none of it may appear.
NOISE = ("oneDNN", "absl::InitializeLog", "cpu_feature_guard", "Using custom data configuration",
         "Downloading and preparing", "Unknown size", "downloaded and prepared", "Variant folder",
         "Generating splits", "Shuffling")  # fmt: skip


def test_importing_the_data_package_prints_nothing():
    out = subprocess.run([sys.executable, "-c", "import sdjax.data, tensorflow_datasets"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0 and out.stderr == "" and out.stdout == "", out.stderr


def test_local_data_is_prepared_in_one_line_without_download_wording(tmp_path, capfd, caplog):
    from sdjax.data import input_pipeline

    input_pipeline.open_source("shapes64", "train", str(tmp_path), "image", None, {"num_train": 4})
    out, err = capfd.readouterr()
    variant = tmp_path / "shapes64" / "train4_val1_seed0" / "1.0.0"
    assert out == ""
    assert err.splitlines() == [f"preparing shapes64 data in {variant} (made locally: nothing is downloaded)"]
    assert not any(noise in caplog.text for noise in NOISE), caplog.text
    input_pipeline.open_source("shapes64", "train", str(tmp_path), "image", None, {"num_train": 4})
    assert capfd.readouterr() == ("", "")  # prepared: nothing to say


def test_the_heartbeat_reports_a_long_phase_every_period_and_is_silent_otherwise(capsys):
    heartbeat = monitor.Heartbeat(every=0.5)
    try:
        with heartbeat.phase("compiling the update step"):
            time.sleep(1.2)
        during = capsys.readouterr().err.splitlines()
        time.sleep(1.2)  # no phase
        after = capsys.readouterr().err
    finally:
        heartbeat.close()
    assert during[:2] == ["still compiling the update step, 0 s", "still compiling the update step, 1 s"], during
    assert after == ""


def test_throughput_leaves_out_the_compiling_step_and_paused_blocks(tmp_path, monkeypatch):
    heartbeat = monitor.Heartbeat(every=60)
    logger = monitor.Logger(tmp_path, 0, 10, images_per_step=8, heartbeat=heartbeat)
    logger.clock = iter([99.0, 100.0, 101.0, 101.5, 105.5]).__next__  # scalars, start_clock, paused x2, scalars
    logged = []
    monkeypatch.setattr(logger.writer, "add_scalar", lambda name, value, step: logged.append((name, value, step)))
    try:
        logger.scalars(1, {"loss": 1.0})  # the compiling step, before the clock starts: no rate
        logger.start_clock(1)
        with logger.paused("saving a checkpoint", state=None):  # 101.0 .. 101.5: not training
            pass
        logger.scalars(5, {"loss": 1.0})  # 4 steps in 5.5 s, 0.5 s of them paused
    finally:
        logger.close()
        heartbeat.close()
    assert [name for name, _, step in logged if step == 1] == ["train/loss"]
    rates = {name: value for name, value, step in logged if step == 5}
    assert rates["train/steps_per_s"] == pytest.approx(4 / 5.0)
    assert rates["train/images_per_s"] == pytest.approx(8 * 4 / 5.0)


def test_the_closing_line_names_the_model_and_the_sample_command(tmp_path):
    config = load_config("shapes64")
    (tmp_path / "checkpoints" / str(config.steps)).mkdir(parents=True)
    assert workdir_lib.closing_line(config, tmp_path) == (
        f"train.py: done, step {config.steps}: the model is {tmp_path}; sample it: python sample.py --model "
        f"{tmp_path} --prompt 'a red circle on a green background' --out out"
    )
    vae = load_config("shapes64_vae")
    assert workdir_lib.closing_line(vae, tmp_path).endswith(f"stage 2 trains on it with --config.vae_path={tmp_path}")
    config.steps += 5  # preempted before the end
    assert workdir_lib.closing_line(config, tmp_path) == (
        f"train.py: stopped at step {config.steps - 5} of {config.steps} in {tmp_path}; rerun the same command to "
        "continue"
    )


@pytest.mark.slow
def test_a_tiny_run_prints_no_banner_a_heartbeat_and_the_closing_line(tmp_path, compilation_cache):
    workdir, data = tmp_path / "run", tmp_path / "tfds"  # new data: it is prepared during the run
    out = subprocess.run(
        [sys.executable, "train.py", "--config=configs/shapes64_vae.py:tiny", f"--workdir={workdir}",
         f"--config.data.data_dir={data}", "--config.steps=12", "--config.log_every=2", "--config.checkpoint_every=6"],
        cwd=REPO, env={**cache_env(compilation_cache), "SDJAX_HEARTBEAT_SECONDS": "2"}, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert not [noise for noise in NOISE if noise in text], text[:3000]
    lines = [line.strip() for line in re.split(r"[\r\n]", out.stderr) if line.strip()]
    assert sum("preparing shapes64 data in" in line and "nothing is downloaded" in line for line in lines) == 1
    assert any(re.fullmatch(r"still compiling the update step, \d+ s", line) for line in lines)
    assert lines[-1] == (
        f"train.py: done, step 12: the VAE is in {workdir}; stage 2 trains on it with --config.vae_path={workdir}"
    )
    # Logged every 2 steps: the first interval (steps 1-2) holds the compiling step 1, so its rate is measured
    # over step 2 alone; a rate that counted a compilation (seconds) would be far below a step's (milliseconds).
    rates = logged_scalars(workdir, "train/steps_per_s")
    assert len(rates) == 6 and min(rates) > 1.0, rates
