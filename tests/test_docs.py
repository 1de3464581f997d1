"""Every Python example in the README and the guides under docs/ runs as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_python_examples_of_a_page_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"__{page.stem}__"}  # one namespace per page: later examples use earlier ones
    for block in python_blocks(page):
        exec(compile(block, str(page), "exec"), namespace)


def test_readme_saves_a_checkpoint_with_its_code_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(python_blocks(ROOT / "README.md")[0], "README.md", "exec"), namespace)
    assert (tmp_path / "tiny-mot" / "modeling_mot.py").exists()


def test_readme_stays_a_short_newcomer_page_that_links_every_guide():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in text, page.name
    commands = re.findall(r"```bash\n(.*?)```", text, flags=re.S)[0].strip().splitlines()
    assert [line.split("#")[0].strip() for line in commands] == ["bash scripts/main.sh", "bash scripts/test.sh"]
