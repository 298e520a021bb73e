"""`--help` is the project's own usage: common commands, every option of the user-facing groups."""
import re
import subprocess
import sys

import pytest

from helpers import ROOT

USER_GROUPS = {"train.py": ["tokenizer", "scale", "data", "loss", "gan", "regularizer", "teacher", "trainer",
                            "logger", "debug", "hydra/launcher"],
               "evaluate.py": ["data", "logger"]}


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_help_lists_common_commands_every_user_option_and_the_docs(script):
    p = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    text = p.stdout
    assert f"python {script} " in text and "README.md" in text
    assert "Powered by Hydra" not in text and "tokenizer_scale" not in text  # not the stock help, no internal groups
    for group in USER_GROUPS[script]:
        line = re.search(rf"^\s+{re.escape(group)}\s+(.*)$", text, re.MULTILINE)
        assert line, f"group {group} missing from {script} --help"
        for option in sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")):
            assert re.search(rf"\b{option}\b", line.group(1)), f"{group}={option} missing from {script} --help"
