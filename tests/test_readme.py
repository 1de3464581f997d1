"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has Python examples"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}  # one namespace: later examples use what earlier ones defined
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "tiny-mot" / "modeling_mot.py").exists()
