"""The GPU image's Dockerfile: lint-clean (hadolint from PyPI) and installing the project's own pins."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PIN = re.compile(r"\b([A-Za-z0-9_.\-\[\]]+)==([0-9][A-Za-z0-9.+\-]*)")


def pins(text: str) -> dict[str, str]:
    return {name.lower().split("[")[0]: version for name, version in PIN.findall(text)}


def test_hadolint_passes():
    hadolint = pathlib.Path(sys.executable).parent / "hadolint"
    run = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_base_image_is_pinned_and_pins_agree_with_requirements():
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    assert ":" in base and not base.endswith(":latest"), base
    required = pins((ROOT / "requirements.txt").read_text())
    for name, version in pins(dockerfile).items():
        assert required.get(name) == version, f"Dockerfile: {name}=={version}; requirements: {required.get(name)}"
    # The image installs requirements.txt itself, dropping only torch (the base image's CUDA build stays).
    assert "COPY requirements.txt" in dockerfile
    dropped = re.findall(r"grep -v '\^([a-z0-9\-]+)=='", dockerfile)
    assert dropped == ["torch"]


def test_entrypoint_and_healthcheck_scripts_exist():
    for script in ("entrypoint.sh", "healthcheck.sh"):
        path = ROOT / "docker" / script
        assert path.is_file() and path.stat().st_mode & 0o111
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "/v2/models/ensemble/ready" in (ROOT / "docker" / "healthcheck.sh").read_text()


def test_the_image_holds_every_module_its_entrypoint_runs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+?)/ ", dockerfile, re.M))
    modules = re.findall(r"-m ([a-z_.]+)", (ROOT / "docker" / "entrypoint.sh").read_text())
    assert modules and {m.split(".")[0] for m in modules} <= copied, (modules, copied)
    for module in modules:
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
