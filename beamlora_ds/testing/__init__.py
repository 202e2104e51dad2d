"""What tests and benchmarks use, standard library only: starting multi-process DeepSpeed jobs (launcher.py, its names
re-exported here: `from beamlora_ds import testing; testing.launch(...)`; spawn.py, the light per-node launcher it
uses), and the named crash and failing-write points (failpoints.py) that any layer of the package may call, so the
kill-and-resume and disk-full tests can stop a run at a chosen moment."""
from .launcher import (NATIVE_CRASH, RETRIED, SHM_BUFFERS, deepspeed_command, free_port, launch, launch_for_json,
                       node_commands, remove_shm_buffers, run, run_together, single_process_env,
                       spawn_command)

__all__ = ["NATIVE_CRASH", "RETRIED", "SHM_BUFFERS", "deepspeed_command", "free_port", "launch", "launch_for_json",
           "node_commands", "remove_shm_buffers", "run", "run_together", "single_process_env",
           "spawn_command"]
