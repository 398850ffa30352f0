"""The README's layout section matches the tree: every folder it names exists, and every package
folder of the project is named there."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _layout_folders() -> set[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    folders, parent = set(), ""
    for line in block.splitlines():
        m = re.match(r"^( *)([\w./]+/)\s", line + " ")
        if not m:
            continue
        indent, name = m.groups()
        if indent:
            folders.add(parent + name)          # an indented entry is a subfolder of the last one
        else:
            parent = name
            folders.add(name)
    return {f.rstrip("/") for f in folders}


def test_every_folder_the_readme_names_exists_and_every_package_is_named():
    named = _layout_folders()
    assert {"orchestrator/sweeping", "evaluators/metrics", "softdimo/math"} <= named
    for folder in named:
        assert (ROOT / folder).is_dir(), f"README layout names {folder}/, which does not exist"
    packages = {str(p.parent.relative_to(ROOT)) for top in ("orchestrator", "evaluators", "trainers")
                for p in (ROOT / top).rglob("__init__.py")}
    packages |= {"softdimo/math"}
    missing = sorted(p for p in packages if p not in named)
    assert not missing, f"package folders missing from README's layout: {missing}"
