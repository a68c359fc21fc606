"""A regular (non-editable) install carries everything a command reads: the built wheel,
installed into a fresh target dir, runs the bare demo and finds its recipes by name."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tracked_copy(dest: Path) -> Path:
    """The repository's files as git knows them (tracked or added; no build/ or egg-info)."""
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True
    ).stdout.split(b"\0")
    for f in filter(None, files):
        src, dst = REPO / f.decode(), dest / f.decode()
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        elif src.is_file():
            shutil.copy2(src, dst)
    return dest


@pytest.mark.slow
def test_wheel_install_runs_the_demo(tmp_path):
    src = tracked_copy(tmp_path / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = tmp_path / "wheels"
    subprocess.run(
        [*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(wheels)],
        check=True,
    )
    (wheel,) = wheels.glob("hobbit_tools-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for want in (
        "hobbit_tools/recipes/demo.toml",
        "hobbit_tools/recipes/mixtral.toml",
        *(
            f"hobbit_tools/profile/calibration/{g}.txt"
            for g in ("prose", "dialogue", "verse", "encyclopaedic")
        ),
        "hobbit_tools/profile/calibration/SOURCES.md",
        "hobbit_tools/demo/checkpoint/config.json",
    ):
        assert want in names, f"the wheel lacks {want}"
    target = tmp_path / "target"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)

    env = {
        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        "PYTHONPATH": str(target),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    where = subprocess.run(
        [sys.executable, "-c", "import hobbit_tools; print(hobbit_tools.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    hobbit = [sys.executable, "-c", "from hobbit_tools.cli import main; main()"]
    r = subprocess.run([*hobbit, "run", "-n", "4"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=1800)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "decode" in r.stderr and r.stdout.strip()
    hf = target / "hobbit_tools" / "demo" / "checkpoint"
    r = subprocess.run([*hobbit, "prepare", str(hf), "-o", str(tmp_path / "m"), "--recipe",
                        "demo", "--no-pack"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
