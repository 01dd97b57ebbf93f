"""The wheel: it builds, carries what it should, and imports where only torch is installed.

The clean environment is a directory holding nothing but links to torch and the distributions
torch itself requires (read from their metadata), put on ``sys.path`` of an isolated interpreter
(``python -I -S``: no site-packages, no ``.pth`` files, so neither this checkout's editable install
nor any framework installed beside torch is visible). The wheel is installed into its own
directory with ``pip install --no-deps --target``. That takes seconds, where a fresh virtual
environment with torch installed into it takes minutes.

Deselect with ``-m "not packaging"`` (building needs pip to fetch setuptools into its isolated
build environment).
"""
from __future__ import annotations

import email
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("composer", "transformers", "accelerate", "lightning", "pytorch_lightning", "timm", "sklearn",
              "matplotlib", "numpy")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # The command `make wheel` runs, into a private folder (dist/ is left alone).
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out),
                           str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    wheels = list(out.glob("zsharp_algos-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _metadata(wheel: Path) -> tuple[email.message.Message, list[str], str]:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_string(zf.read(f"{info}/METADATA").decode())
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    return meta, names, entry_points


def test_wheel_metadata_license_and_contents(wheel):
    meta, names, entry_points = _metadata(wheel)
    assert meta["Name"] == "zsharp-algos"
    assert meta["License-Expression"] == "Apache-2.0"  # the SPDX string, not the deprecated table
    license_file = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(license_file).decode()
    assert (ROOT / "LICENSE").read_text() == text
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    # Only the package: no tests, benchmarks, integrations or configs.
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"zsharp_algos"}, tops
    # Every module of the checkout's package is in the wheel (no subpackage lost by packages.find).
    in_tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "zsharp_algos").rglob("*.py")}
    assert in_tree <= set(names), sorted(in_tree - set(names))
    # Each extra that a framework section of the README names.
    extras = set(meta.get_all("Provides-Extra"))
    assert {"composer", "hf", "lightning", "vision", "demo", "dev", "all"} <= extras
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("numpy") and 'extra == "demo"' in r for r in requires)  # the demo imports it
    assert any(r.startswith("lightning==") for r in requires)
    # The console scripts point at modules the wheel holds.
    scripts = dict(re.findall(r"^(\S+)\s*=\s*(\S+)$", entry_points.split("[console_scripts]")[1], re.M))
    assert set(scripts) >= {"zsharp-compare", "zsharp-hf"}
    for script, target in scripts.items():
        module = target.split(":")[0]
        path = module.replace(".", "/")
        assert f"{path}.py" in names or f"{path}/__init__.py" in names, f"{script} -> {target}: no such module"


def _torch_only_dir(dest: Path) -> Path:
    """Links to torch and, recursively, the distributions its metadata requires (markers
    evaluated for this interpreter): nothing else importable."""
    from packaging.markers import default_environment  # pip's vendored copy is not public; packaging is a dep of pytest
    from packaging.requirements import Requirement

    dest.mkdir()
    env = default_environment()
    todo, seen = ["torch"], set()
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        dist = md.distribution(name)
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate(dict(env, extra="")):
                todo.append(r.name)
        root = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if top == "__pycache__" or top.endswith(".pth"):
                continue
            src, link = root / top, dest / top
            if src.exists() and not link.exists():
                link.symlink_to(src)
    return dest


def test_wheel_installs_and_imports_with_only_torch(wheel, tmp_path):
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                           "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    torch_only = _torch_only_dir(tmp_path / "torch-only")
    assert not (torch_only / "zsharp_algos").exists()
    code = f"""
import sys
sys.path[:0] = [{str(target)!r}, {str(torch_only)!r}]
import zsharp_algos
assert zsharp_algos.__file__.startswith({str(target)!r}), zsharp_algos.__file__   # the wheel, not the checkout
from zsharp_algos import *
names = list(zsharp_algos.__all__)
missing = [n for n in names if n not in globals()]
assert not missing, missing
for fw in {FRAMEWORKS!r}:
    assert fw not in sys.modules, fw + " was imported by import zsharp_algos / from zsharp_algos import *"
    try:
        __import__(fw)
    except ImportError:
        pass
    else:
        raise AssertionError(fw + " is importable: the environment is not clean")
import torch
m = torch.nn.Linear(4, 2)
opt = ZSharp(m.parameters(), torch.optim.SGD, lr=0.1)
x = torch.randn(8, 4)
def closure():
    opt.zero_grad()
    loss = m(x).square().mean()
    loss.backward()
    return loss
before = m.weight.detach().clone()
opt.step(closure)
assert not torch.equal(before, m.weight)
print("ok", torch.__version__, sorted(names))
"""
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.startswith("ok")
