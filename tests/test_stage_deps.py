"""dvc.yaml lists, for every stage, each package file its script imports (so editing one reruns
the stage), and the code digests that fingerprint checkpoints and studies follow the code."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fmnist import sources

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_script(stage: dict) -> Path:
    """The script of a `python stages/x.py` command."""
    words = stage["cmd"].split()
    assert words[0] == "python" and words[1].startswith("stages/"), stage["cmd"]
    return REPO / words[1]


def missing_deps(script: Path, deps: list) -> list[str]:
    """Repository paths of the files `script` runs that `deps` does not list."""
    listed = {dep if isinstance(dep, str) else next(iter(dep)) for dep in deps}
    needed = [path.relative_to(REPO).as_posix() for path in sources.source_closure(script)]
    return [path for path in needed if path not in listed]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_imported_package_module_is_a_dependency_of_its_stage(name: str) -> None:
    stage = STAGES[name]
    assert missing_deps(stage_script(stage), stage["deps"]) == []


@pytest.mark.parametrize("name", sorted(STAGES))
def test_removing_any_source_dependency_is_detected(name: str) -> None:
    stage = STAGES[name]
    code = [dep for dep in stage["deps"] if isinstance(dep, str) and dep.endswith(".py")]
    assert code, f"{name} lists no source files"
    for dep in code:
        fewer = [d for d in stage["deps"] if d != dep]
        assert missing_deps(stage_script(stage), fewer) == [dep]


def test_lazy_imports_inside_functions_count(tmp_path: Path) -> None:
    script = tmp_path / "stage.py"
    script.write_text("def main():\n    from fmnist.sam import SAM\n")
    names = {path.name for path in sources.source_closure(script)}
    assert {"sam.py", "__init__.py"} <= names


def test_relative_and_whole_package_imports_count(tmp_path: Path) -> None:
    script = tmp_path / "stage.py"
    script.write_text("import fmnist\nfmnist.load_model('x')\n")
    names = {path.name for path in sources.source_closure(script)}
    assert {"__init__.py", "loading.py", "modelfile.py", "h5weights.py"} <= names
    # a relative import inside the package resolves against the importing file's package
    tree = sources.ast.parse("from .sam import SAM\nfrom . import figures\n")
    modules, _ = sources._imports([tree], sources.PACKAGE_DIR / "train.py")
    assert {"fmnist.sam", "fmnist.figures"} <= modules


def test_the_train_stage_does_not_depend_on_the_h5_format() -> None:
    # modelfile and h5weights used to import each other, so every model reader ran both.
    names = {p.name for p in sources.source_closure(REPO / "stages" / "train.py")}
    assert "modelfile.py" in names and "h5weights.py" not in names


def test_code_digest_changes_with_any_imported_file(edit_source) -> None:
    before = sources.code_digest("fmnist.train")
    assert sources.code_digest("fmnist.train") == before
    edit_source("sam.py")
    after = sources.code_digest("fmnist.train")
    assert after != before
    edit_source("figures.py")  # training never imports it
    assert sources.code_digest("fmnist.train") == after
