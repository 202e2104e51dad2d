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
