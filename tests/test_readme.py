"""The README's Python examples run as written (executed in order, sharing one namespace)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    ns: dict = {}
    for code in blocks:
        exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - our own documentation
    assert ns["out"].shape == (18, 224, 224, 3) and ns["status"] == ["ok"] * 18
    assert ns["batch"].shape == ns["images"].shape and ns["shifted"].shape == ns["images"].shape


def test_ci_runs_the_readmes_test_command_with_the_constraints():
    block = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)[0]
    command = [line for line in block.splitlines() if line and not line.startswith("#")][1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "-c .ci/constraints.txt" in command and "--no-deps staintools" in command
    assert command.replace("pip install ", "pip install -q ") in ci


def test_constraints_pin_exact_versions_and_one_opencv():
    from importlib import metadata

    lines = [x for x in (README.parent / ".ci" / "constraints.txt").read_text().splitlines() if x and not x.startswith("#")]
    assert lines and all("==" in x for x in lines)
    names = {x.split("==")[0].lower().replace("_", "-") for x in lines}
    assert "opencv-python" not in names and "opencv-python-headless" in names
    installed = {(d.metadata["Name"] or "").lower() for d in metadata.distributions()}
    cv2_dists = installed & {"opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"}
    assert len(cv2_dists) == 1, cv2_dists  # two packages providing cv2 overwrite each other's files


def test_bundled_fallbacks_are_byte_identical_to_the_shared_images():
    import hashlib

    from .conftest import DATA, _bundled_copies

    for parts, copy in _bundled_copies().items():
        original = DATA.joinpath(*parts)
        assert copy.is_file(), copy
        if original.exists():
            assert hashlib.sha256(original.read_bytes()).digest() == hashlib.sha256(copy.read_bytes()).digest(), parts
