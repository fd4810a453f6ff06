"""The scripts' flags (peft_svd_cli.params): --help answers without heavy imports and shows
each default once."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = [os.path.join(ROOT, "examples", name) for name in ("fewshot.py", "evaluate_adapter.py")]
HEAVY = ("torch", "transformers", "datasets", "accelerate", "peft", "evaluate", "open_clip", "PIL", "numpy", "peft_svd")

_IMPORTS_OF_HELP = """
import json, runpy, sys

HEAVY = __HEAVY__
found = {}
for script in __SCRIPTS__:
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit:
        pass
    found[script] = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
print(json.dumps(found))
"""


def test_help_imports_nothing_heavy():
    """--help of both scripts imports neither torch nor the `peft_svd` package (whose import
    registers the method with PEFT, several seconds): it answers in a fraction of a second."""
    code = _IMPORTS_OF_HELP.replace("__HEAVY__", repr(HEAVY)).replace("__SCRIPTS__", repr(SCRIPTS))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {script: [] for script in SCRIPTS}


def _option_blocks(help_text: str) -> list[str]:
    blocks, current = [], []
    for line in help_text.splitlines():
        if re.match(r"\s{2}-", line) and current:
            blocks.append(" ".join(current))
            current = []
        current.append(line.strip())
    return blocks + [" ".join(current)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_each_default_once(script, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("script_under_test", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--eval-batch-size" in text and "(default: 128)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    for block in _option_blocks(text):
        assert block.lower().count("default") <= 1, block


def test_threads_default_divides_the_cores_among_the_processes():
    from peft_svd_cli import params

    assert [params.default_threads(n, 8) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    assert params.default_threads(1, None) == 1
