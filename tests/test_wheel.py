"""`pip install .` gives a real wheel that works with no source tree beside it (issue 19, item 9).

The wheel is built from a copy of the checkout (its ignored build outputs left out: setuptools
never empties a stale build/lib, and the checkout is not written to), installed with pip into a
fresh virtual environment, and run from an empty directory: ``star-mamba --help``, a two-step
pretraining on the built-in synthetic images and a linear probe of its checkpoint.

Nothing is downloaded: the fresh environment reaches torch and the other dependencies through a
``.pth`` file holding this environment's site-packages as a plain path line. A plain path line
does not process the ``.pth`` files of the directory it adds (``site.addsitedir`` would), so the
editable install of this checkout there (``__editable__.star_mamba-*.pth`` and its finder) stays
out: the test checks that ``star_mamba`` imports from the installed wheel.
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .conftest import PRETRAIN_RUN, QUIET, ROOT, make_shapes

pytestmark = pytest.mark.slow  # about a minute on a busy 2-core machine

# What never goes into the copy the wheel is built from: at the top of the checkout, the
# git-ignored outputs (.gitignore) and the environment; anywhere, byte code and egg-info.
TOP_IGNORED = {".git", ".venv", "build", "dist", "runs", ".whl", ".pytest_cache"}
# setuptools' warnings about what it installs: "Package 'star_mamba.configs.x' is absent from
# the `packages` configuration ... Package would be ignored", "Installing ... as data is
# deprecated", and any other SetuptoolsDeprecationWarning or BuildBackendWarning
BUILD_WARNING = re.compile(r"Warning\b|would be ignored|is deprecated|as data", re.IGNORECASE)
WHERE = """
import importlib, importlib.metadata, importlib.resources, json, pkgutil
import star_mamba
for m in pkgutil.walk_packages(star_mamba.__path__, "star_mamba."):
    if m.name != "star_mamba.__main__":  # that one runs the command line
        importlib.import_module(m.name)
configs = importlib.resources.files("star_mamba") / "configs"
print(json.dumps(dict(
    module=star_mamba.__file__, configs=str(configs),
    metadata=str(importlib.metadata.distribution("star-mamba").locate_file("")),
    config_tasks=sorted(p.name for p in configs.iterdir() if p.is_dir()))))
"""
# the log line ("linear probe top-1 59.38 (wd 0.001, ...), 20-NN top-1 50.00, ...") and, before
# the command printed it once only, the summary line ("CKPT: linear probe top-1 59.38% ...")
TOP1 = re.compile(r"linear probe top-1 (\d+\.\d+)%? .*?(\d+)-NN top-1 (\d+\.\d+)")


def _ignore(directory: str, names: list[str]) -> set[str]:
    top = Path(directory) == ROOT
    return {n for n in names if n == "__pycache__" or n.endswith(".egg-info")
            or (top and (n in TOP_IGNORED or n.startswith("output")))}


def _env(venv_bin: Path) -> dict:
    """This process's environment without what could put another star_mamba on the path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE",
                        "VIRTUAL_ENV", "PYTHONSAFEPATH")}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1",
               PATH=os.pathsep.join([str(venv_bin), env.get("PATH", "")]))
    return env


def _run(argv, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, (f"{argv} -> {done.returncode}\n{done.stdout[-3000:]}\n"
                                  f"{done.stderr[-3000:]}")
    return done


def _build_wheel(tmp_path: Path) -> tuple[Path, Path, str]:
    """(the wheel, the source copy it was built from, the build's output)."""
    src, wheelhouse = tmp_path / "src", tmp_path / "wheelhouse"
    shutil.copytree(ROOT, src, symlinks=True, ignore=_ignore)
    done = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                 "--no-index", "--disable-pip-version-check", "-w", wheelhouse, src],
                cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wheels = list(wheelhouse.glob("star_mamba-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], src, done.stdout + done.stderr


def _check_contents(wheel: Path, src: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = [n for n in names if n.split("/")[0].endswith(".dist-info")]
    package = [n for n in names if n.startswith("star_mamba/")]
    # only the package and its metadata: nothing from tests/, benchmarks/, experiments/, docs/,
    # scripts/ or the root configs link
    assert sorted(dist_info + package) == sorted(names), \
        sorted(set(names) - set(package) - set(dist_info))
    tree = src / "src" / "star_mamba"
    modules = {p.relative_to(src / "src").as_posix() for p in tree.rglob("*.py")
               if "__pycache__" not in p.parts}
    configs = {p.relative_to(src / "src").as_posix() for p in (tree / "configs").rglob("*.yaml")}
    assert {"star_mamba/__init__.py", "star_mamba/cli.py"} <= modules and len(configs) >= 3
    assert {n for n in package if n.endswith(".py")} == modules
    assert {n for n in package if n.startswith("star_mamba/configs/")} == configs
    assert {n for n in package if not n.endswith(".py")} == configs  # no stray data either
    entry_points = next(n for n in dist_info if n.endswith("/entry_points.txt"))
    assert "star-mamba = star_mamba.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def _fresh_venv(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(its python, its bin/, its site-packages), this environment's packages reachable."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    site = Path(subprocess.run([python, "-I", "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"], check=True,
                               capture_output=True, text=True).stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    # plain path lines: appended to sys.path after the fresh site-packages, their own .pth
    # files (the editable install's among them) not processed
    (site / "main_env_packages.pth").write_text("".join(f"{p}\n" for p in ours))
    return python, bin_dir, site


def test_wheel_installs_and_runs_without_the_source_tree(tmp_path):
    pytest.importorskip("pip", reason="pip builds and installs the wheel")
    wheel, src, build_log = _build_wheel(tmp_path)
    warnings = [line.strip() for line in build_log.splitlines() if BUILD_WARNING.search(line)
                and "byte-compiling is disabled" not in line]  # PYTHONDONTWRITEBYTECODE
    assert not warnings, "\n".join(warnings)
    _check_contents(wheel, src)

    python, bin_dir, site = _fresh_venv(tmp_path)
    env = _env(bin_dir)
    work = tmp_path / "work"  # the runs' working directory: no source tree, no configs/
    work.mkdir()
    _run([python, "-m", "pip", "install", "--isolated", "--no-deps", "--no-index",
          "--ignore-installed", "--disable-pip-version-check", "--no-warn-script-location",
          wheel], cwd=work, env=env)

    # star_mamba, its metadata and its configs come from the wheel, not from the checkout, and
    # every module imports from the installed copy alone
    where = json.loads(_run([python, "-c", WHERE], cwd=work, env=env).stdout.splitlines()[-1])
    for path in (where["module"], where["metadata"], where["configs"]):
        assert Path(path).resolve().is_relative_to(site.resolve()), where
        assert not Path(path).resolve().is_relative_to(ROOT), where
    from star_mamba.engine.config import TASKS
    assert where["config_tasks"] == sorted(TASKS), where  # a built-in config folder per task
    script = bin_dir / "star-mamba"
    assert str(python) in script.read_text()[:1000]  # pip wrote it for this venv

    helped = _run([script, "--help"], cwd=work, env=env).stdout
    assert "star-mamba pretrain" in helped and "linprobe" in helped

    # two pretraining steps of the tiny model (RGB, for the probe's ImageFolder below) on the
    # built-in synthetic images, from the built-in pretrain/fashion_mnist config
    pre = work / "pre"
    sets = [*PRETRAIN_RUN, "model.in_chans=3", "run.max_steps=2"]
    _run([script, "pretrain", *(f"--set={s}" for s in sets), "--output-dir", pre], cwd=work,
         env=env)
    checkpoint = pre / "checkpoint-latest.pth"
    assert checkpoint.is_file() and (pre / "config.yaml").is_file()
    rows = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses), losses

    # the linear probe of its frozen backbone on a small ImageFolder
    shapes, probe = work / "shapes", work / "probe"
    make_shapes(shapes, per_class=8)  # 4 classes: 32 train, 16 val images
    sets = ["data.name=imagefolder", f"data.root={shapes}", "data.crop_pct=1.0",
            "probe.weight_decays=[1e-4, 1e-2]", "probe.knn_k=5", *QUIET]
    done = _run([script, "linprobe", "--pretrained", checkpoint, "--output-dir", probe,
                 *(f"--set={s}" for s in sets)], cwd=work, env=env)
    printed = set(TOP1.findall(done.stdout + done.stderr))
    assert printed, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((probe / "linprobe.json").read_text())
    assert result["checkpoint"] == str(checkpoint)
    assert (result["n_train"], result["n_test"]) == (32, 16)
    assert 0 <= result["linear_probe_top1"] <= 100 and 0 <= result["knn_top1"] <= 100
    for top1, k, knn in printed:  # every number printed is the one written
        assert float(top1) == pytest.approx(result["linear_probe_top1"], abs=0.005), printed
        assert float(knn) == pytest.approx(result["knn_top1"], abs=0.005), printed
        assert k == "5", printed


def test_editable_install_is_a_path_entry_for_src_without_a_layout_warning(tmp_path):
    """The src layout: `pip install -e .` (setup.sh) puts src/ on sys.path with a plain .pth
    line. A flat layout gets a meta-path finder instead, and with it setuptools' "folders with
    the same name as your package" warning (pip shows it; checked here: no finder, no text)."""
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(ROOT, src, symlinks=True, ignore=_ignore)
    done = _run([sys.executable, "-W", "always", "-c",
                 "import sys, setuptools.build_meta as b; print(b.build_editable(sys.argv[1]))",
                 out], cwd=src, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "same name" not in done.stdout + done.stderr
    wheel = out / done.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as z:
        pth = [n for n in z.namelist() if n.endswith(".pth")]
        assert len(pth) == 1 and z.read(pth[0]).decode().strip() == str(src / "src")
        assert not [n for n in z.namelist() if "finder" in n]
