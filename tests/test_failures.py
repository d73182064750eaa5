"""Failure modes that end cleanly (issue 18): checkpoint write failures, one writer per workdir,
verified restores, bad files in image folders, converter and command-line errors, SIGKILL chaos.

The command-line cases run ``python -m jvit.main`` as a subprocess on a tiny config file (a 2-block
HVT at 16 px on mock data) and assert the one ``error:`` line and that no traceback is printed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from PIL import Image

from jvit.convert import cli as convert_cli
from jvit.data import sources
from jvit.errors import ConfigError
from jvit.train import loop
from jvit.train import workdir as workdir_lib

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("compilation_cache")  # in-process reruns load the first run's compile

TINY_CONFIG = textwrap.dedent("""
    from jvit.train import config as config_lib

    def get_config():
        c = config_lib.default_config()
        c.model.name = "hvt_ti_1"
        c.model.img_size = 16
        c.model.kwargs.update(patch_size=4, num_heads=2, head_dim=8, num_blocks=2, pool_block_width=1)
        c.input.dataset = "mock"
        c.input.mock_train_examples, c.input.mock_eval_examples, c.input.mock_num_classes = 48, 8, 5
        c.input.num_threads = 1
        c.batch_size = 16
        c.eval_batch_size = 8
        c.num_train_steps = 4
        c.optimizer.update(lr=1e-2, warmup_epochs=0.5, min_lr=1e-4)
        c.checkpoint.every_steps = 2
        c.log_every_steps = 1
        c.eval_every_steps = 0
        return config_lib.finalize(c)
""")


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.py"
    path.write_text(TINY_CONFIG)
    return path


def jvit_main(config: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m jvit.main`` on ``config``; asserts no traceback reached the console."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "jvit.main", "--config", str(config), "--workdir", str(workdir), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=240,
        check=False,
    )
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    return out


def saved_params(workdir: Path, step: int) -> dict:
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")["params"]
    return jax.tree.map(np.asarray, restored)


# --- command line ---------------------------------------------------------------------------------


def test_misspelt_override_is_one_line_with_the_suggestion(tiny, tmp_path):
    out = jvit_main(tiny, tmp_path / "w", "--config.num_train_stepz=2")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and 'did you mean "num_train_steps"' in out.stderr.lower()


def test_model_kwargs_accept_any_constructor_argument_and_suggest_on_typos(tiny, tmp_path):
    # drop_rate is not set by the config: a plain ml_collections override could not add it.
    out = jvit_main(
        tiny,
        tmp_path / "w",
        "--config.model.kwargs.drop_rate=0.25",
        "--config.num_train_steps=2",
        "--config.model.kwargs.num_blocks=1",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    model = json.loads((tmp_path / "w" / "config.json").read_text())["model"]["kwargs"]
    assert model["drop_rate"] == 0.25 and model["num_blocks"] == 1
    out = jvit_main(tiny, tmp_path / "w2", "--config.model.kwargs.drop_rat=0.1")
    assert out.returncode == 2
    assert "no constructor argument 'drop_rat'; did you mean \"drop_rate\"?" in out.stderr
    from jvit.main import apply_model_kwargs
    from tests.test_train import tiny_config

    config = tiny_config()
    with pytest.raises(ValueError, match=r"num_blocks=two: expected a int"):
        apply_model_kwargs(config, [("num_blocks", "two")])
    apply_model_kwargs(config, [("drop_rate", "0"), ("mlp_ratio", "2")])  # ints widen to the fields' floats
    assert config.model.kwargs.drop_rate == 0.0 and isinstance(config.model.kwargs.mlp_ratio, float)


def test_workdir_that_is_a_file(tiny, tmp_path):
    (tmp_path / "w").write_text("")
    out = jvit_main(tiny, tmp_path / "w")
    assert out.returncode == 1 and f"error: --workdir {tmp_path / 'w'} is a file, not a directory" in out.stderr


def test_finished_run_restarted_reports_its_metrics_and_a_failed_save_stops_the_run(tiny, tmp_path):
    work = tmp_path / "w"
    first = jvit_main(tiny, work, "--config.num_train_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    final = next(line for line in first.stdout.splitlines() if line.startswith("final:"))
    again = jvit_main(tiny, work, "--config.num_train_steps=2")
    assert again.returncode == 0 and "already finished (step 2 = num_train_steps)" in again.stderr
    assert "nan" not in again.stdout
    loss = final.split("train/loss=")[1].split()[0]
    assert f"train/loss={loss}" in again.stdout and "(already finished)" in again.stdout

    # The checkpoint directory becomes unwritable (as root, only an immutable flag stops writes).
    ckpt = work / "checkpoints"
    before = saved_params(work, 2)
    if subprocess.run(["chattr", "+i", str(ckpt)], capture_output=True, check=False).returncode:
        pytest.skip("chattr +i is not supported on this filesystem")
    try:
        t0 = time.time()
        failed = jvit_main(tiny, work, "--config.num_train_steps=6")
        took = time.time() - t0
    finally:
        subprocess.run(["chattr", "-i", str(ckpt)], check=True)
    assert failed.returncode == 1
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: cannot write checkpoint 4 to {ckpt / '4'}: Operation not permitted"
    ), failed.stderr[-2000:]
    assert took < 60
    assert sorted(os.listdir(ckpt)) == ["2"]  # the earlier checkpoint is untouched
    np.testing.assert_equal(saved_params(work, 2), before)


def test_init_from_an_unsafe_or_broken_file_is_one_line(tiny, tmp_path, evil_checkpoint):
    out = jvit_main(tiny, tmp_path / "w", f"--config.init_from={evil_checkpoint}")
    assert out.returncode == 1
    assert "references posix.system" in out.stderr and "set init_from to the converted directory" in out.stderr
    from jvit.convert import CheckpointFormatError
    from jvit.train import state as state_lib
    from tests.test_train import tiny_config

    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match=f"{empty} is empty \\(0 bytes\\)"):
        state_lib.load_pretrained(tiny_config(init_from=str(empty)))


# --- one writer per workdir -----------------------------------------------------------------------


def test_second_run_on_a_live_workdir_is_refused_and_a_stale_lock_taken_over(tiny, tmp_path, caplog):
    work = tmp_path / "w"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from jvit.train import workdir; workdir.acquire(sys.argv[1]); "
                "print('held', flush=True); time.sleep(120)"
            ),
            str(work),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        out = jvit_main(tiny, work)
        assert out.returncode == 1
        assert f"is in use by another run (pid {holder.pid} on host" in out.stderr
        assert not (work / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without releasing: its lock file names a dead pid, which is taken over with a warning.
    assert json.loads((work / "LOCK").read_text())["pid"] == holder.pid
    lock = workdir_lib.acquire(str(work))
    assert f"taking over the stale lock of a run that is no longer alive (pid {holder.pid}" in caplog.text
    assert json.loads((work / "LOCK").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (work / "LOCK").exists()


# --- verified restore -----------------------------------------------------------------------------


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    from tests.test_train import tiny_config

    caplog.set_level(logging.INFO, logger="jvit.train")
    work = tmp_path / "w"
    loop.train_and_evaluate(tiny_config(num_train_steps=4), str(work))
    # Cut every array data file of step 4 in half (ocdbt keeps them under .../d/).
    for data_file in (work / "checkpoints" / "4" / "state").rglob("d/*"):
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    reference = tmp_path / "ref"
    loop.train_and_evaluate(tiny_config(num_train_steps=6), str(reference))
    result = loop.train_and_evaluate(tiny_config(num_train_steps=6), str(work))
    assert "checkpoint step 4 in" in caplog.text and "is damaged and was not used" in caplog.text
    assert f"resumed from {work / 'checkpoints'} at step 2" in caplog.text and result["step"] == 6
    assert [p.name.split("-")[0] for p in (work / "damaged_checkpoints").iterdir()] == ["4"]
    # Resumed from step 2, the run ends exactly where the uninterrupted one does.
    np.testing.assert_equal(saved_params(work, 6), saved_params(reference, 6))


# --- bad files in image folders -------------------------------------------------------------------


def _jpeg(path: Path, size: int = 20) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8)).save(path, "JPEG")


def _bomb(path: Path) -> None:
    """A small JPEG whose frame header claims 30000 x 30000 pixels (PIL's DecompressionBombError)."""
    _jpeg(path)
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (30000).to_bytes(2, "big") * 2
    path.write_bytes(bytes(data))


@pytest.fixture
def bad_folder(tmp_path) -> Path:
    root = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                _jpeg(root / split / cls / f"{i}.jpg")
    train = root / "train" / "a"
    (train / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (train / "x.jpg").mkdir()
    _bomb(root / "train" / "b" / "bomb.jpg")
    return root


def _folder_config(root: Path):
    from tests.test_train import tiny_config

    return tiny_config(**{"input.dataset": f"folder:{root}"}).input


def test_unusable_entries_are_skipped_at_scan_time_in_training(bad_folder, caplog):
    split = sources.open_split(_folder_config(bad_folder), "train", train=True, img_size=16, seed=0)
    assert len(split.data) == 9  # 8 images + the bomb (only decoding finds it)
    assert f"skipping {bad_folder / 'train' / 'a' / 'dangling.jpg'} in " in caplog.text
    assert "broken symlink" in caplog.text
    assert f"skipping {bad_folder / 'train' / 'a' / 'x.jpg'} in " in caplog.text and "a directory" in caplog.text
    assert "skipped 2 unusable entries" in caplog.text
    bomb = next(i for i, (path, _) in enumerate(split.data.data.files) if path.endswith("bomb.jpg"))
    example = split.data[bomb]
    assert example["image"].size == (20, 20) and split.data.skipped == 1
    assert "b/bomb.jpg" in caplog.text and "exceeds limit" in caplog.text


def test_unreadable_file_is_skipped_in_training_and_an_error_in_eval(bad_folder, monkeypatch, caplog):
    # Tests run as root, where mode 000 does not stop reads: report the file as unreadable instead.
    secret = str(bad_folder / "val" / "b" / "1.jpg")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == secret else real_access(p, mode))
    with pytest.raises(ConfigError, match=r"unusable image .*val/b/1.jpg: not readable \(permission denied\)"):
        sources.open_split(_folder_config(bad_folder), "val", train=False, img_size=16, seed=0)


def test_bad_eval_file_through_the_command_line_is_one_line(bad_folder, tiny, tmp_path):
    _bomb(bad_folder / "val" / "a" / "0.jpg")
    out = jvit_main(
        tiny,
        tmp_path / "w",
        f"--config.input.dataset=folder:{bad_folder}",
        "--config.input.eval_splits=('val',)",
        "--config.batch_size=8",
        "--config.num_train_steps=2",
    )
    assert out.returncode == 1
    assert "error: cannot decode image" in out.stderr and "a/0.jpg" in out.stderr
    assert "skipping " in out.stderr and "dangling.jpg" in out.stderr


# --- converter ------------------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return os.system, ("true",)


@pytest.fixture
def evil_checkpoint(tmp_path) -> Path:
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": _Evil()}, path)
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("empty", "is empty (0 bytes): not a checkpoint"),
        ("garbage", "is not a PyTorch checkpoint (neither a zip archive nor a pickle"),
        ("truncated", "is a damaged zip archive (truncated or corrupt"),
        ("pickle_garbage", "is truncated, corrupt or not a PyTorch checkpoint"),
        ("evil", "refusing to unpickle"),
        ("evil_legacy", "refusing to unpickle"),
    ],
)
def test_converter_tells_broken_files_from_unsafe_pickles(tmp_path, capsys, kind, message):
    path = tmp_path / f"{kind}.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x13" + random.Random(0).randbytes(999))
    elif kind == "pickle_garbage":
        path.write_bytes(b"\x80\x02" + random.Random(0).randbytes(999))
    elif kind == "truncated":
        torch.save({"w": torch.zeros(100)}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        torch.save({"w": torch.zeros(2), "x": _Evil()}, path, _use_new_zipfile_serialization=kind == "evil")
    code = convert_cli.main([str(path), "--model", "hvt_ti_1", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err
    if kind.startswith("evil"):
        assert "it references posix.system" in err
    else:
        assert "--trust-checkpoint" not in err


# --- chaos ----------------------------------------------------------------------------------------


def _chaos(tiny: Path, tmp_path: Path, kills: int, steps: int) -> None:
    """SIGKILL a short run ``kills`` times, each a random moment after a random checkpoint started
    being written (checkpoints every step, so kills land inside saves and between them), rerun to
    the end, and compare the final parameters with an uninterrupted run's. All runs share one
    compilation cache: only the first compiles."""
    args = (
        f"--config.num_train_steps={steps}",
        "--config.checkpoint.every_steps=1",
        f"--config.compilation_cache_dir={tmp_path / 'compilation_cache'}",
    )
    reference = jvit_main(tiny, tmp_path / "ref", *args)
    assert reference.returncode == 0, reference.stderr[-2000:]
    work, rng = tmp_path / "chaos", random.Random(18)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "jvit.main", "--config", str(tiny), "--workdir", str(work), *args]
    targets = sorted(rng.sample(range(1, steps), kills))
    for target in targets:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not any(  # wait until step `target` (or a later one) is being saved
            int(name.split(".")[0]) >= target for name in _listdir(work / "checkpoints") if name[0].isdigit()
        ):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    final = jvit_main(tiny, work, *args)
    assert final.returncode == 0, final.stderr[-2000:]
    np.testing.assert_equal(saved_params(work, steps), saved_params(tmp_path / "ref", steps))


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def test_sigkill_chaos_reduced(tiny, tmp_path):
    _chaos(tiny, tmp_path, kills=2, steps=6)


@pytest.mark.slow
def test_sigkill_chaos(tiny, tmp_path):
    _chaos(tiny, tmp_path, kills=5, steps=12)
