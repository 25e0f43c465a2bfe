"""The test environment itself: every package of the dev extra is installed, so no test passes by skipping."""

from __future__ import annotations

import configparser
from importlib import metadata

from packaging.requirements import Requirement

from cloudseg.paths import REPO_ROOT
from tests.needs import DEV_EXTRA
from tests.services import unavailable


def dev_extra() -> list[Requirement]:
    """setup.cfg's ``[options.extras_require] dev``, parsed."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "setup.cfg")
    lines = cfg["options.extras_require"]["dev"].splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]


def unmet(req: Requirement, extra: str = "") -> list[str]:
    """What of ``req`` is missing or at a version it excludes, its own extras' requirements included (one level)."""
    if req.marker is not None and not req.marker.evaluate({"extra": extra}):
        return []
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return [f"{req} (not installed)"]
    if not req.specifier.contains(version, prereleases=True):
        return [f"{req} (found {version})"]
    problems = []
    for name in sorted(req.extras):
        for dep in metadata.requires(req.name) or []:
            sub = Requirement(dep)
            if sub.marker is not None and sub.marker.evaluate({"extra": name}):
                sub.marker = None
                problems += [f"{p}, for {req.name}[{name}]" for p in unmet(sub)]
    return problems


def test_the_dev_extra_is_installed():
    """A package of the dev extra that is missing turns the tests that need it into skips: under CI=true that is a
    failure, elsewhere one skip that names what to install."""
    reqs = dev_extra()
    assert {"pytest", "ukis-csmask", "onnx", "rustac"} <= {r.name for r in reqs}  # setup.cfg was read
    problems = [p for r in reqs for p in unmet(r)]
    if problems:
        unavailable(f"the dev extra is incomplete: {'; '.join(problems)}; {DEV_EXTRA}")
