"""The built distribution: one top-level import name (`flowstore`), safe next to other packages
called `adapters` or `projections`, with its CLI and console files, and an sdist that can test.

The wheel is installed without dependencies into a fresh virtual environment; the dependencies come
from this test run's environment through a `.pth` line (nothing is downloaded, and this checkout's
editable install is not visible there: only its plain site-packages directory is).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # Without PYTHONPATH: the installed wheel must be what the fresh venv imports.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO)
    return out


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel (its python's path)."""
    env = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    purelib = Path(
        run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip()
    )
    (purelib / "test-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    wheel = next(dist.glob("*.whl"))
    run(
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-compile",
        "--target",
        purelib,
        wheel,
    )
    return python


def fake_wheel(where: Path, name: str) -> Path:
    """A wheel of a distribution that installs the top-level package `name` (like AdapterHub's)."""
    wheel = where / f"{name}-9.9-py3-none-any.whl"
    info = f"{name}-9.9.dist-info"
    files = {
        f"{name}/__init__.py": f"OWNER = 'the other {name}'\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 9.9\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/top_level.txt": f"{name}\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in {**files, f"{info}/RECORD": record}.items():
            archive.writestr(path, text)
    return wheel


def test_the_wheel_installs_flowstore_alone_at_the_top_level(dist: Path) -> None:
    wheel = next(dist.glob("*.whl"))
    assert wheel.name.startswith("flowstore_es-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = next(n for n in names if n.endswith("top_level.txt"))
        assert archive.read(top_level).decode().split() == ["flowstore"]
        assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
            "flowstore"
        }
        for shipped in (
            "flowstore/adapters/cli/__init__.py",
            "flowstore/projections/sql.py",
            "flowstore/adapters/http/console/static/console.css",
            "flowstore/adapters/http/console/templates/base.html",
            "flowstore/adapters/kafka/envelope.schema.json",
            "flowstore/py.typed",
        ):
            assert shipped in names, shipped
        assert any(n.endswith("licenses/LICENSE") for n in names)
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        assert b"Classifier: Typing :: Typed" in metadata
        assert b"Project-URL: Flow model (@owlmeans/flow), https://github.com/owlmeans/" in metadata
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt")))
        assert b"flowstore = flowstore.adapters.cli:main" in entry_points
        assert b"kafka = flowstore.adapters.kafka.publisher:kafka_publisher" in entry_points


def test_the_rebuilds_read_ahead_process_starts_from_the_installed_package(
    installed: Path, tmp_path: Path
) -> None:
    """The child puts the folder holding `flowstore` on its path, not a folder inside it."""
    purelib = run(
        installed, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"
    ).stdout.strip()
    code = (
        "from flowstore.projections import readahead as r; print(r.package_root()); print(r._BOOT)"
    )
    root, boot = run(installed, "-c", code, cwd=tmp_path).stdout.strip().splitlines()
    assert Path(root) == Path(purelib)
    # The child's program imports and, its parent gone at once (no settings), ends quietly.
    child = subprocess.run(
        [installed, "-c", boot, root],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr


def test_the_sdist_carries_the_tests_and_the_linked_packages(dist: Path) -> None:
    with tarfile.open(next(dist.glob("*.tar.gz"))) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for needed in (
        "LICENSE",
        "Makefile",
        "tests/conftest.py",
        "tests/unit/test_errors.py",
        "benchmarks/run.py",
        "flowstore/adapters/cli/__init__.py",
        "flowstore/projections/sql.py",
    ):
        assert needed in names, needed


def test_an_app_with_its_own_adapters_and_projections_packages_still_gets_ours(
    installed: Path, tmp_path: Path
) -> None:
    app = tmp_path / "app"
    for package in ("adapters", "projections"):
        (app / package).mkdir(parents=True)
        (app / package / "__init__.py").write_text("MINE = True\n")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    # python -m puts the app's folder first on sys.path, where its own packages shadow any others.
    version = run(installed, "-m", "flowstore.adapters.cli", "--version", cwd=app)
    # Read-only commands create no database: make one first (through the installed package).
    run(
        installed,
        "-c",
        f"from flowstore import FlowStore; FlowStore({url!r}, kafka=False).close()",
        cwd=app,
    )
    assert version.stdout.strip().startswith("flowstore ")
    listed = run(
        installed, "-m", "flowstore.adapters.cli", "--url", url, "--json", "flows", "list", cwd=app
    )
    assert json.loads(listed.stdout) == []
    code = (
        "import adapters, projections, flowstore.adapters.kafka.publisher as p;"
        "from flowstore import FlowStore;"
        f"store = FlowStore({url!r}, kafka=False);"
        "print(adapters.MINE, projections.MINE, p.__name__, store.log_position()); store.close()"
    )
    assert run(installed, "-c", code, cwd=app).stdout.split() == [
        "True",
        "True",
        "flowstore.adapters.kafka.publisher",
        "0",
    ]


def test_the_console_files_are_served_from_the_installed_package(
    installed: Path, tmp_path: Path
) -> None:
    code = f"""
from fastapi.testclient import TestClient
from flowstore import FlowStore
from flowstore.adapters.http import JwtVerifier, create_app
with FlowStore("sqlite:///{tmp_path / "ui.db"}") as store:
    app = create_app(store, JwtVerifier("s" * 32))
    with TestClient(app) as client:
        css = client.get("/ui/static/console.css")
        page = client.get("/ui/login")
        print(css.status_code, "flowstore" in css.text or len(css.text) > 100, page.status_code)
"""
    assert run(installed, "-c", code, cwd=tmp_path).stdout.split() == ["200", "True", "200"]


def test_another_distribution_named_adapters_neither_overwrites_nor_deletes_ours(
    installed: Path, tmp_path: Path
) -> None:
    purelib = Path(
        run(
            installed, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"
        ).stdout.strip()
    )
    for name in ("adapters", "projections"):
        other = fake_wheel(tmp_path, name)
        run(
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--target",
            purelib,
            "--upgrade",
            other,
        )
        assert (
            run(installed, "-c", f"import {name}; print({name}.OWNER)", cwd=tmp_path).stdout.strip()
            == f"the other {name}"
        )
        # pip --target has no uninstall: remove it as pip would, by its RECORD.
        for line in (purelib / f"{name}-9.9.dist-info" / "RECORD").read_text().splitlines():
            path = purelib / line.split(",")[0]
            path.unlink(missing_ok=True)
    check = "import flowstore.adapters.cli, flowstore.projections.sql; print('ok')"
    assert run(installed, "-c", check, cwd=tmp_path).stdout.strip() == "ok"
