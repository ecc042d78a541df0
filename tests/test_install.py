"""The project installs as a library: a wheel built from the tree, installed into a fresh virtualenv,
imports from outside the repository and runs its console scripts."""
import os
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # builds a wheel and a virtualenv: ~30 s


# The new virtualenv's processes see neither the checkout (PYTHONPATH) nor the build's egg-info in it,
# which made pip take the wheel as installed already.
OUTSIDE = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def running_site_packages() -> list[str]:
    """The folders this interpreter imports installed packages from: a virtualenv's own, or the
    system's, whichever runs the tests (system_site_packages would see the base interpreter's only)."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(p for p in [*site.getsitepackages(), paths["purelib"], paths["platlib"]]
                              if Path(p).is_dir()))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """-> (python, scripts folder) of a new virtualenv holding only the built wheel; the packages it
    needs come from this interpreter's site-packages, listed in a .pth file (no download, no second
    5 GB torch)."""
    tmp = tmp_path_factory.mktemp("install")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp / "dist")],
                           capture_output=True, text=True, cwd=tmp)
    if build.returncode and "setuptools" in build.stderr:
        pytest.skip(f"no setuptools to build with (the package index is unreachable?): {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr
    wheel, = (tmp / "dist").glob("clip_foundation-*.whl")
    venv.create(tmp / "venv", with_pip=True)
    bin_dir = tmp / "venv" / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, env=OUTSIDE).stdout.strip()
    # after the venv's own folder on sys.path, so the installed wheel comes first
    (Path(own) / "running_interpreter.pth").write_text("\n".join(running_site_packages()) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, cwd=tmp, env=OUTSIDE)
    return python, bin_dir, tmp


def test_the_wheel_imports_from_outside_the_repository(installed):
    python, _, tmp = installed
    out = subprocess.run([str(python), "-c", "import clipModel, hf_towers, timm_towers, scratch_towers, clip_foundation, clip_foundation.training.command; "
                          "print(clipModel.__file__); print(clip_foundation.__file__)"],
                         capture_output=True, text=True, cwd=tmp, env=OUTSIDE)
    assert out.returncode == 0, out.stderr
    for line in out.stdout.split():  # the installed copies, not the checkout's
        assert str(tmp / "venv") in line and str(ROOT) not in line


def console_scripts() -> list[str]:
    import tomllib
    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


@pytest.mark.parametrize("command", console_scripts())  # every command pyproject.toml installs
def test_console_scripts_run(installed, command):
    _, bin_dir, tmp = installed
    out = subprocess.run([str(bin_dir / command), "--help"], capture_output=True, text=True, cwd=tmp, env=OUTSIDE)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()
