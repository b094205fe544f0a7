"""The wheel ships every package: pyproject's explicit package list names each folder with an __init__.py
(an editable install finds an unlisted subpackage anyway, so only this test notices one missing)."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(["wmdeploy", *p.parent.relative_to(ROOT / "wmdeploy").parts])
             for p in (ROOT / "wmdeploy").rglob("__init__.py")}
    assert found - listed == set()
    assert {"wmdeploy.runtimes", "wmdeploy.models"} <= listed  # the two mapped from other folders
