"""Reset lines are logged by one process (issue 13, point 7): two real gloo processes, each with its own controller
and plain optimizer, reach the same reset; only process 0 says so in the log (both keep the record in history)."""
import json
import logging
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from beamlora_ds.testing.launcher import free_port


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import sys

        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from helpers import regression_batches
        from helpers import make_run, train_step

        lines = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append(record.getMessage())
        logging.getLogger("beamlora_ds.method.controller").addHandler(handler)
        logging.getLogger("beamlora_ds.method.controller").setLevel(logging.INFO)
        model, beam, opt = make_run(seed=0, interval=4, total_steps=12)
        for batch in regression_batches(9):
            train_step(model, opt, batch)
            beam.step(opt)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"lines": lines, "resets": [r["step"] for r in beam.history]}, f)
    finally:
        dist.destroy_process_group()


def test_only_process_zero_logs_reset_lines(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert runs[0]["resets"] == runs[1]["resets"] == [4, 8]
    assert [line for line in runs[0]["lines"] if "reset at step" in line] != []
    assert sum("reset at step 4" in line for line in runs[0]["lines"]) == 1
    assert runs[1]["lines"] == []
