"""The README's first command runs examples/train_plain.py: keep it working (short form)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plain_example_trains_and_resets():
    out = subprocess.run([sys.executable, "examples/train_plain.py", "--steps", "24", "--interval", "6",
                          "--pretrain_steps", "20"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "reset at step 6:" in out.stdout and "reset at step 12:" in out.stdout
    assert "done: 3 resets" in out.stdout
