"""The README's first command runs examples/train_plain.py: keep it working (short form)."""
import os
import sys

from beamlora_ds import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plain_example_trains_and_resets():
    out = testing.run([sys.executable, "examples/train_plain.py", "--steps", "24", "--interval", "6",
                       "--pretrain_steps", "20"], timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "reset at step 6:" in out.stdout and "reset at step 12:" in out.stdout
    assert "done: 3 resets" in out.stdout


def test_docs_show_the_complete_scripts_exactly():
    """docs/integration.md's complete scripts are the files the tests run (tests/distributed/
    test_integration_examples.py), so what a user copies is what was tested."""
    with open(os.path.join(ROOT, "docs", "integration.md")) as f:
        page = f.read()
    for script in ("train_deepspeed.py", "train_trainer.py"):
        with open(os.path.join(ROOT, "examples", script)) as f:
            assert "```python\n" + f.read() + "```" in page, script
