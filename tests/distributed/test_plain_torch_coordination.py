"""Process coordination without DeepSpeed: in a plain torch.distributed job (torchrun, DDP, accelerate without
DeepSpeed) every process knows its rank, save_adapter has one writer and every process returns. (Each process once
took itself for process 0 of 1: two wrote into one folder, and one failed with FileExistsError.)"""
import os
import shutil

from beamlora_ds import testing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = '''
import os, sys, torch
import torch.distributed as dist
dist.init_process_group("gloo")
import beamlora_ds
from beamlora_ds.backends import coordination
from beamlora_ds.loading.builtin import tiny_llama
assert "deepspeed.comm" not in sys.modules or not __import__("deepspeed.comm").comm.is_initialized()
model = tiny_llama(torch.float32)
beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=4, alpha=8, total_steps=10, interval=5))
out = sys.argv[-1]
for attempt in range(3):  # three writes into fresh folders: a second writer would race or find the folder taken
    beamlora_ds.save_adapter(model, os.path.join(out, f"adapter{attempt}"))
print(f"process {dist.get_rank()}: rank {coordination.rank()} of {coordination.world_size()}, all saved", flush=True)
dist.destroy_process_group()  # else gloo's threads may still run at exit: "terminate called" (a native abort)
'''


def test_one_writer_and_every_rank_known_under_plain_torch_distributed(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "out"
    proc = testing.run(testing.spawn_command(str(worker), [str(out)], 2), timeout=300, cwd=ROOT,
                       before_retry=lambda: shutil.rmtree(out, ignore_errors=True))  # a retry starts fresh
    said = proc.stdout.split(testing.RETRIED)[-1]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "process 0: rank 0 of 2, all saved" in said and "process 1: rank 1 of 2, all saved" in said, said
    assert sorted(os.listdir(out)) == ["adapter0", "adapter1", "adapter2"]  # no second writer's temporary folder
