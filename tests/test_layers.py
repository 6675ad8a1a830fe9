"""The import layers (scripts/check_layers.py) and the deprecated import paths of the redesign."""
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "scripts" / "check_layers.py"


def check(root) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), str(root)], capture_output=True, text=True)


def test_the_package_keeps_its_layers():
    result = check(REPO)
    assert result.returncode == 0, result.stdout
    assert "every arrow points down; no cycles" in result.stdout


def test_an_upward_import_a_cycle_and_a_needless_local_import_are_each_caught(tmp_path):
    shutil.copytree(REPO / "llmfoundry_lite", tmp_path / "llmfoundry_lite",
                    ignore=shutil.ignore_patterns("__pycache__"))
    models = tmp_path / "llmfoundry_lite" / "models" / "config.py"
    models.write_text(models.read_text() + "\nfrom llmfoundry_lite.training import entry  # noqa\n")
    files = tmp_path / "llmfoundry_lite" / "files.py"
    files.write_text(files.read_text() + "\n\ndef late():\n    import json  # lazy: no reason good enough\n"
                     "    return json\n")
    errors = tmp_path / "llmfoundry_lite" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom llmfoundry_lite import files  # noqa\n")
    files.write_text(files.read_text() + "\nfrom llmfoundry_lite import errors  # noqa\n")
    out = check(tmp_path)
    assert out.returncode == 1
    assert "models.config (layer 3) imports training.entry (layer 7), a higher layer" in out.stdout
    assert "function-local import of json is not a lazy boundary" in out.stdout
    assert "import cycle:" in out.stdout and "errors" in out.stdout and "files" in out.stdout


def test_import_llmfoundry_lite_stays_cheap_and_train_is_the_function():
    code = ("import sys, llmfoundry_lite; assert 'composer' not in sys.modules and 'transformers' not in sys.modules; "
            "import llmfoundry_lite.training.entry; from llmfoundry_lite import train; "
            "assert callable(train) and train.__module__ == 'llmfoundry_lite', train; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_moved_import_paths_still_work_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from llmfoundry_lite.assembly import lora
        from llmfoundry_lite.export.lora import apply_lora
        from llmfoundry_lite.train.builders import DecoupledLionW
        from llmfoundry_lite.training import builders
    assert apply_lora is lora.apply_lora and DecoupledLionW is builders.DecoupledLionW
    moved = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any("llmfoundry_lite.train.builders moved to llmfoundry_lite.training.builders" in m for m in moved), moved
    import llmfoundry_lite
    assert callable(llmfoundry_lite.train)  # still the function, not the alias package
