"""The wheel carries the training loop: after a (non-editable) install, `python -m training.train`
and the `tckernels-train` script work from any directory, on the configs and tiny assets it ships."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _isolation() -> list:
    """Build with this environment's setuptools when it can make wheels (quicker, offline); else let
    pip fetch the build requirements into an isolated environment."""
    try:
        import setuptools
        from packaging.version import Version

        can = Version(setuptools.__version__) >= Version("70.1") or __import__("importlib").util.find_spec("wheel")
    except ImportError:
        can = False
    return ["--no-build-isolation"] if can else []


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel (built without the native extension, which does not matter here) unpacked into a
    folder, as pip would put it into site-packages; built from a copy so the checkout stays clean."""
    tmp = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    src = tmp / "src"
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *_isolation(), "-q", "-w", str(tmp / "dist"), "."],
        cwd=src, capture_output=True, text=True, env={**os.environ, "TCK_NO_NATIVE": "1"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    wheel = next((tmp / "dist").glob("tckernels-*.whl"))
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    return site, names


def test_the_wheel_has_the_loop_its_configs_and_assets(installed):
    _, names = installed
    for must in ("training/train.py", "training/transcoders.py", "training/configs/tiny.yaml",
                 "training/configs/transcoders_tiny.yaml", "training/configs/r1_distil_7b.yaml",
                 "training/assets/tiny/base/model.safetensors", "training/assets/tiny/base/char_tokenizer.json",
                 "training/assets/tiny/train.jsonl"):
        assert must in names, must
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    site, _ = installed
    scripts = (site / entry_points).read_text()
    assert "tckernels-train = training.train:main" in scripts
    assert "tckernels-train-transcoders = training.transcoders:main" in scripts


def test_the_installed_loop_runs_from_another_directory(installed, tmp_path):
    site, _ = installed
    env = {**os.environ, "PYTHONPATH": str(site), "TCK_NO_NATIVE": "1"}
    code = (
        "import os, training, training.config as c\n"
        "cfg = c.load_config([])\n"
        "assert training.__file__.startswith(os.environ['PYTHONPATH']), training.__file__\n"
        "assert os.path.isdir(cfg.base_model) and os.path.isfile(cfg.train_data), (cfg.base_model, cfg.train_data)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr
    for loop in ("training.train", "training.transcoders"):
        out = subprocess.run([sys.executable, "-W", "ignore", "-m", loop, "--help"], cwd=tmp_path,
                             capture_output=True, text=True, env=env)
        assert out.returncode == 0 and "Defaults below are those of" in out.stdout, (loop, out.stdout + out.stderr)
