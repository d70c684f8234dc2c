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


def test_base_image_is_pinned_and_the_build_installs_and_checks_every_pin():
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    assert ":" in base and not base.endswith(":latest"), base
    required = pins((ROOT / "requirements.txt").read_text())
    for name, version in pins(dockerfile).items():
        assert required.get(name) == version, f"Dockerfile: {name}=={version}; requirements: {required.get(name)}"
    # requirements.txt whole (torch too: the tested release, not the base image's), then the check of every pin
    install = re.search(r"^RUN .*pip install --no-cache-dir -r requirements.txt \\\n\s+&& python "
                        r"docker/check_pins.py requirements.txt$", dockerfile, re.M)
    assert install, "the image must install requirements.txt and check its pins in one step"
    assert "grep -v" not in dockerfile  # no pin dropped on the way
    assert dockerfile.index("COPY docker/check_pins.py") < install.start()


def check_pins(requirements: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "docker" / "check_pins.py"), str(requirements)],
                          capture_output=True, text=True)


def test_the_pin_check_passes_on_what_the_tests_run_and_names_each_difference(tmp_path):
    assert check_pins(ROOT / "requirements.txt").returncode == 0  # this venv holds the pins (torch's +cpu aside)
    import megatron.core
    import torch

    release = torch.__version__.split("+")[0]
    other = tmp_path / "requirements.txt"
    other.write_text(f"torch=={release}+cu126  # the same release for another device\n"
                     f"megatron-core=={megatron.core.__version__}\nnumpy<2\ntqdm\n")
    assert check_pins(other).returncode == 0
    other.write_text("torch==2.6.0\nnvidia-pytriton[extra]==0.7.0 ; python_version >= '3.8'\n"
                     "megatron-core==0.12.0\nno-such-package==1.0\n")
    run = check_pins(other)
    assert run.returncode == 1
    assert f"torch: pinned 2.6.0, installed {torch.__version__}" in run.stderr
    assert f"megatron-core: pinned 0.12.0, installed {megatron.core.__version__}" in run.stderr
    assert "no-such-package: pinned 1.0, not installed" in run.stderr and "pytriton" not in run.stderr


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
