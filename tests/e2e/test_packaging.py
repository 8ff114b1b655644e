"""What pip installs works: the wheel, built from the source tree and installed in a fresh
virtualenv outside the checkout, starts a project and serves it.

Slow (about 40 s: build, a new virtualenv, installing the dependencies from pip's cache),
and still part of `make test`, which `.ci/run` runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.examples import example_project
from tests.support.paths import ROOT
from tests.support.server import free_port, wait_for_json


def run(*args: str | Path, cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result.stdout


def source_tree(target: Path) -> Path:
    """The files git knows of or would add (tracked, and new but not ignored), copied: the
    build writes into its source tree, and the checkout must stay as it is."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())
    return target


@pytest.mark.slow
def test_the_built_wheel_starts_a_project_and_serves_it_outside_the_checkout(
    tmp_path: Path,
) -> None:
    # Nothing of the checkout leaks in: no LIFECYCLE_* settings, no PYTHONPATH.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_") and k != "PYTHONPATH"
    }
    src = source_tree(tmp_path / "src")
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "-w",
        tmp_path / "dist",
        src,
        cwd=tmp_path,
        env=env,
    )
    (wheel,) = (tmp_path / "dist").glob("lifecycle-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path, env=env)
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", wheel, cwd=tmp_path, env=env)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    lifecycle = venv / "bin" / "lifecycle"
    work = tmp_path / "work"
    work.mkdir()

    made = run(lifecycle, "new", "shop", cwd=work, env=env)
    assert "rules/ (5 playbooks: complaint_escalation, loyalty_reward, re_engagement" in made
    shop = work / "shop"
    assert (shop / "templates" / "messages" / "email" / "welcome.html").is_file()
    assert "rules ok: 5 playbooks" in run(lifecycle, "init", cwd=shop, env=env)
    assert "5 playbooks ok" in run(lifecycle, "rules", "check", cwd=shop, env=env)
    where = run(
        venv / "bin" / "python", "-c", "import engine; print(engine.__file__)", cwd=shop, env=env
    )
    assert where.startswith(str(venv)), where  # the installed package, not the checkout

    port = free_port()
    server = subprocess.Popen(
        [lifecycle, "serve", "--port", str(port)],
        cwd=shop,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for_json(server, f"http://127.0.0.1:{port}/healthz") == {"status": "ok"}
        login = httpx.get(f"http://127.0.0.1:{port}/console/login", timeout=10)
        assert login.status_code == 200 and "Sign in" in login.text  # templates shipped
        css = httpx.get(f"http://127.0.0.1:{port}/static/console.css", timeout=10)
        assert css.status_code == 200 and css.text.strip()  # static files shipped
    finally:
        server.terminate()
        server.communicate(timeout=60)


def test_new_writes_the_example_project_and_never_overwrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["new", "shop"])
    assert result.exit_code == 0, result.output
    example = example_project()
    for source, relative in example.files():
        assert (tmp_path / "shop" / relative).read_bytes() == source.read_bytes()
    (tmp_path / "other" / "rules").mkdir(parents=True)
    (tmp_path / "other" / "rules" / "welcome_series.yaml").write_text("# mine\n")
    result = runner.invoke(app, ["new", "other"])
    assert result.exit_code == 1
    assert (
        "other already has rules/welcome_series.yaml: nothing was written; choose a new "
        "directory or move those files away"
    ) in result.output
    assert sorted(p.name for p in (tmp_path / "other").rglob("*")) == [
        "rules",
        "welcome_series.yaml",
    ]
    assert (tmp_path / "other" / "rules" / "welcome_series.yaml").read_text() == "# mine\n"
