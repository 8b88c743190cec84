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
