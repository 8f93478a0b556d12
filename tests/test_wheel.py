"""Issue 11, item 1: the wheel carries the pages, and an installed `steerway serve` finds
them wherever the package is, with no setting, from any working directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.processes import ROOT, spawn_gateway

pytestmark = pytest.mark.slow

# what the wheel is built from: the files the Dockerfile copies into its build stage
SOURCES = ("pyproject.toml", "README.md", "gateway", "store", "web")
TYPES = {
    ".html": ("text/html",),
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".svg": ("image/svg+xml",),
}
# `import … from "./x.js"`, `export … from "./x.js"`, `import "./x.js"`
JS_IMPORT = re.compile(
    r"""^\s*(?:(?:import|export)\b[^"';]*?\bfrom\s*|import\s*)["']([^"']+)["']""", re.M
)
CSS_URL = re.compile(r"""url\(\s*["']?([^"')]+)""")


class _Assets(HTMLParser):
    """The URLs a page loads: every `<script src>` and `<link href>`."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href"}.get(tag)
        found = dict(attrs).get(wanted) if wanted else None
        if found:
            self.urls.append(found)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv, outside the repository, with the wheel installed in it; its
    `steerway` console script.

    The wheel is built the way `pip install .` builds it (isolated, setuptools from pip's
    cache or the index), from a copy of the sources: an in-tree build leaves a build/
    directory whose stale files would end up in the next wheel. The project's
    dependencies are not reinstalled (minutes, and the network): a .pth file puts this
    test run's site-packages after the fresh venv's own. That directory holds the
    editable install's finder, but a .pth line only adds a path, it does not run the
    .pth files there, so `gateway` can only come from the wheel; the test checks that."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", tmp / "dist", src], check=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("steerway-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
    python = venv / "bin" / "python"
    subprocess.run(
        [*pip, "--python", python, "install", "--no-deps", "--no-index", wheel],
        check=True,
        timeout=120,
    )
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (Path(purelib) / "steerway-test-deps.pth").write_text("".join(f"{p}\n" for p in ours))
    where = subprocess.run(
        [python, "-c", "import gateway; print(gateway.__file__)"],
        cwd=tmp,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv)  # the wheel's, not the checkout's
    site = Path(where).parent.parent
    # every module of the checkout is in the wheel (pyproject.toml lists the packages)
    for module in [*ROOT.glob("gateway/**/*.py"), *ROOT.glob("store/**/*.py")]:
        assert (site / module.relative_to(ROOT)).is_file(), module
    return venv / "bin" / "steerway"


async def test_an_installed_wheel_serves_the_pages_from_anywhere(
    installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STEERWAY_WEB_DIR", raising=False)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    gateway = await spawn_gateway("--store", "memory", command=[installed], cwd=elsewhere)
    try:
        async with httpx.AsyncClient(base_url=gateway.http, timeout=10) as http:
            seen: dict[str, str] = {}  # path -> the file of web/ it must be
            todo = [("/", "index.html"), ("/dashboard", "dashboard.html")]
            while todo:
                path, file = todo.pop()
                if path in seen:
                    continue
                seen[path] = file
                response = await http.get(path)
                assert response.status_code == 200, path
                kind = response.headers["content-type"].split(";")[0].strip()
                assert kind in TYPES[Path(file).suffix], (path, kind)
                assert response.content == (ROOT / "web" / file).read_bytes(), path
                for url in _loads(file, response.text):
                    target = urlsplit(urljoin(f"http://host{path}", url)).path
                    todo.append((target, target.lstrip("/")))
    finally:
        assert await gateway.terminate() == 0
    # every module and stylesheet of the pages was reached through their links and imports
    assert {"index.html", "dashboard.html", "favicon.svg"} <= set(seen.values())
    for kind in ("js/*.js", "css/*.css"):
        assert {str(f.relative_to(ROOT / "web")) for f in (ROOT / "web").glob(kind)} <= set(
            seen.values()
        )


def _loads(file: str, text: str) -> list[str]:
    """The URLs one file of the pages loads (absolute ones are not ours to check)."""
    if file.endswith(".html"):
        parser = _Assets()
        parser.feed(text)
        urls = parser.urls
    elif file.endswith(".js"):
        urls = JS_IMPORT.findall(text)
    elif file.endswith(".css"):
        urls = CSS_URL.findall(text)
    else:
        urls = []
    return [url for url in urls if not urlsplit(url).scheme]
