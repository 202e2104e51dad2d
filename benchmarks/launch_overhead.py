"""What starting a 2-process DeepSpeed job costs before any work: DeepSpeed's launcher, torchrun, and spawn.py.

    python3 benchmarks/launch_overhead.py                          # 3 launches each, ~1 min on a 2-core CPU
    python3 benchmarks/launch_overhead.py --quick --json out.json   # CI smoke test: one spawn.py launch, ~5 s

Each launch runs this file as the worker: import DeepSpeed, join the process group (`deepspeed.init_distributed`,
gloo on CPU), one barrier, exit. The wall time from starting the launcher to its exit is what the job pays before
its first line of work: DeepSpeed's launcher imports torch and DeepSpeed in its runner and again in its per-node
launcher before the workers start; spawn.py (beamlora_ds/testing/spawn.py, what the tests use) uses the standard
library only; torchrun imports torch once. The launchers run round-robin (the order rotated every round), so the
same machine noise hits all. Reported: each launcher's median and min over the repeats and its ratio (of the
medians) to DeepSpeed's launcher, the baseline measured in the same run.
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
LAUNCHERS = ("deepspeed", "torchrun", "spawn")


def join_and_exit() -> None:
    """The worker: what every launch of the test suite does first, and nothing else."""
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60))
    dist.barrier()


def launch_command(launcher: str, nproc: int, port: int) -> list:
    from beamlora_ds import testing

    worker = [os.path.abspath(__file__), "--worker"]
    if launcher == "deepspeed":
        return testing.deepspeed_command(worker[0], worker[1:], nproc, port=port)
    if launcher == "torchrun":
        torchrun = shutil.which("torchrun") or "torchrun"
        return [torchrun, f"--nproc_per_node={nproc}", f"--master_port={port}", *worker]
    return testing.spawn_command(worker[0], worker[1:], nproc, port=port)


def time_launch(launcher: str, nproc: int) -> float:
    from beamlora_ds import testing

    port = testing.free_port()
    start = time.perf_counter()
    proc = testing.run(launch_command(launcher, nproc, port), timeout=300, cwd=ROOT)
    seconds = time.perf_counter() - start
    testing.remove_shm_buffers(port)
    if proc.returncode != 0:
        raise RuntimeError(f"{launcher} launch failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return seconds


def measure(launchers, repeats: int, nproc: int) -> dict:
    times = {name: [] for name in launchers}
    for round_index in range(repeats):
        shift = round_index % len(launchers)
        for name in launchers[shift:] + launchers[:shift]:
            times[name].append(time_launch(name, nproc))
    return times


def summarize(times: dict) -> dict:
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians.get("deepspeed")
    return {name: {"median_s": medians[name], "min_s": min(values), "runs_s": values,
                   "ratio_to_deepspeed": medians[name] / base if base else None}
            for name, values in times.items()}


def print_table(summary: dict, nproc: int, repeats: int) -> None:
    print(f"\nStarting {nproc} processes that join the group and exit ({repeats} launches each, seconds)\n")
    print(f"{'launcher':<12}{'median':>10}{'min':>10}{'x deepspeed':>14}")
    for name, row in summary.items():
        ratio = "" if row["ratio_to_deepspeed"] is None else f"{row['ratio_to_deepspeed']:.2f}"
        print(f"{name:<12}{row['median_s']:>10.2f}{row['min_s']:>10.2f}{ratio:>14}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launchers", default=",".join(LAUNCHERS), help="comma-separated, of " + ", ".join(LAUNCHERS))
    p.add_argument("--repeats", type=int, default=3, help="launches per launcher")
    p.add_argument("--nproc", type=int, default=2, help="processes per launch")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="one spawn.py launch (the smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.launchers, args.repeats = "spawn", 1
    launchers = [name for name in args.launchers.split(",") if name]
    unknown = sorted(set(launchers) - set(LAUNCHERS))
    if unknown or not launchers or args.repeats < 1 or args.nproc < 1:
        p.error(f"--launchers from {', '.join(LAUNCHERS)} (unknown: {unknown}); --repeats and --nproc >= 1")
    summary = summarize(measure(launchers, args.repeats, args.nproc))
    print_table(summary, args.nproc, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"nproc": args.nproc, "repeats": args.repeats, "cpu_count": os.cpu_count(),
                       "launchers": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        join_and_exit()
    else:
        sys.exit(main())
