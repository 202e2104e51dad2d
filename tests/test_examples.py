"""The README's first command runs examples/train_plain.py: keep it working (short form)."""
import os
import sys

import pytest

from beamlora_ds import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plain_example_trains_and_resets():
    out = testing.run([sys.executable, "examples/train_plain.py", "--steps", "24", "--interval", "6",
                       "--pretrain_steps", "20"], timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "reset at step 6:" in out.stdout and "reset at step 12:" in out.stdout
    assert "done: 3 resets" in out.stdout


# every page that shows a complete script, and the scripts it shows: the files the tests run
SHOWN = {"integration.md": ["train_deepspeed.py", "train_trainer.py"], "ddp.md": ["train_ddp.py"],
         "accelerate.md": ["train_accelerate.py"], "trl.md": ["train_trl.py"]}


@pytest.mark.parametrize("page, scripts", SHOWN.items())
def test_docs_show_the_complete_scripts_exactly(page, scripts):
    """docs/ shows these scripts verbatim, and the tests run them (tests/distributed/test_integration_examples.py,
    tests/integrations/), so what a user copies is what was tested."""
    with open(os.path.join(ROOT, "docs", page)) as f:
        text = f.read()
    for script in scripts:
        with open(os.path.join(ROOT, "examples", script)) as f:
            assert "```python\n" + f.read() + "```" in text, (page, script)
