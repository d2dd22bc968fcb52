"""Release metadata (issue 27, item 7): a LICENSE file and the license, classifiers, Python versions and py.typed
in pyproject.toml, so the package can be used and published."""
import os

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")  # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_license_file_is_apache_2():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_pyproject_has_release_metadata():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    project = meta["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert project["requires-python"] == ">=3.10"
    assert "Programming Language :: Python :: 3.10" in project["classifiers"]
    assert "Typing :: Typed" in project["classifiers"]
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["deis_fast"]
    assert os.path.isfile(os.path.join(ROOT, "deis_fast", "py.typed"))
