"""What the loading benchmarks (load_memory.py, startup_scale.py) share: host memory and disk measuring, the
random model they load, and where their results go.

- `status_bytes(pid)`: VmRSS, VmHWM, RssAnon (heap and tensors) and RssFile (pages of mapped files, such as an
  mmapped checkpoint) of a process, from /proc.
- `NodeSampler`: every 20 ms, the memory of the worker processes that announced themselves with a pid file, per
  process and summed over the node at the same instant, with the peaks.
- `busy_cpu_s()`: CPU seconds the whole machine has spent busy (from /proc/stat), to tell how much of a launch's
  time other work took.
- `evict(folder)` and `read_speed(folder)`: drop a saved checkpoint's pages from the page cache (posix_fadvise,
  no root needed) so that a launch reads it from disk, and the disk's cold and the page cache's warm read speed.
- `save_random_llama(folder, **config)`: the model a benchmark loads, random and saved in bf16.
- `write_result(result, json_path, quick, name)`: where both write their JSON.
"""
import glob
import json
import os
import re
import threading
import time

MiB = 2 ** 20
FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def status_bytes(pid="self") -> dict:
    """VmRSS, VmHWM, RssAnon and RssFile of a process, in bytes ({} once it is gone)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in FIELDS:
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


class NodeSampler:
    """Every 20 ms: the anonymous, file-backed and total resident memory of the worker processes that announced
    themselves (a `rank<N>.pid` file each in `folder`), per process and the anonymous and total summed at that
    instant; keeps the peaks. Stops when a worker writes its `.measured` file (after deepspeed.initialize: what
    comes later is the benchmark's own check or training). With `mapped_under`, every 50th sample (about once a
    second: parsing a process's smaps costs ~15 ms) also reads each process's /proc/<pid>/smaps for the resident
    pages of the files it maps from that folder (a checkpoint): `peak_mapped`, which says which processes read the
    checkpoint's bytes (a mapping that lives well under a second can be missed). With `phase_marker` (a file name
    ending, such as ".loaded"), the peaks are also kept for the first phase alone, until every announced process
    has written its marker: `phase_node_anon`, `phase_peak_anon`."""

    def __init__(self, folder: str, every_s: float = 0.02, mapped_under: str = None, phase_marker: str = None):
        self.folder, self.every_s, self.mapped_under, self.phase_marker = folder, every_s, mapped_under, phase_marker
        self.peak_anon, self.peak_rss, self.peak_file, self.node_anon, self.node_rss = {}, {}, {}, 0, 0
        self.peak_mapped, self.phase_peak_anon, self.phase_node_anon, self._samples = {}, {}, 0, 0
        self.timeline = []  # (time.time(), {rank: anonymous MiB}) every ~0.5 s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        last = time.time()
        while not self._stop.is_set() and not glob.glob(os.path.join(self.folder, "*.measured")):
            in_phase = self.phase_marker and len(glob.glob(os.path.join(self.folder, "*" + self.phase_marker))) < \
                len(glob.glob(os.path.join(self.folder, "rank*.pid")))
            now, sample = time.time(), self._sample()
            self.node_anon = max(self.node_anon, sum(anon for anon, _ in sample.values()))
            if in_phase:
                self.phase_node_anon = max(self.phase_node_anon, sum(anon for anon, _ in sample.values()))
                for rank, (anon, _) in sample.items():
                    self.phase_peak_anon[rank] = max(self.phase_peak_anon.get(rank, 0), anon)
            self.node_rss = max(self.node_rss, sum(rss for _, rss in sample.values()))
            if sample and now - last >= 0.5:
                self.timeline.append((round(now, 1), {rank: round(anon / MiB) for rank, (anon, _) in sample.items()}))
                last = now
            self._stop.wait(self.every_s)

    def _sample(self) -> dict:
        """{rank: (anonymous, resident)} bytes of every announced process now; updates the per-process peaks."""
        sample = {}
        for path in glob.glob(os.path.join(self.folder, "rank*.pid")):
            rank = os.path.basename(path)[4:-4]
            try:
                with open(path) as f:
                    pid = int(f.read())
            except (OSError, ValueError):
                continue
            values = status_bytes(pid)
            anon, rss = values.get("RssAnon", 0), values.get("VmRSS", 0)
            self.peak_anon[rank] = max(self.peak_anon.get(rank, 0), anon)
            self.peak_rss[rank] = max(self.peak_rss.get(rank, 0), rss)
            self.peak_file[rank] = max(self.peak_file.get(rank, 0), values.get("RssFile", 0))
            if self.mapped_under and self._samples % 50 == 0:
                mapped = resident_mapped(pid, self.mapped_under)
                self.peak_mapped[rank] = max(self.peak_mapped.get(rank, 0), mapped)
            sample[rank] = (anon, rss)
        self._samples += 1
        return sample


MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$")


def resident_mapped(pid: int, folder: str) -> int:
    """Resident bytes of the mappings of files under `folder` in process `pid` (0 once it is gone)."""
    total, inside = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                header = MAPPING.match(line)
                if header:
                    inside = header.group(1).startswith(folder)
                elif inside and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    return total


def busy_cpu_s() -> float:
    """CPU seconds every core of the machine has spent on anything but idling and waiting for I/O, since boot."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def checkpoint_files(folder: str) -> list:
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")))


def evict(folder: str) -> None:
    """Drop the checkpoint files' pages from the page cache, so the next read comes from the disk."""
    for path in checkpoint_files(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_speed(folder: str, cold: bool) -> float:
    """Bytes per second reading the checkpoint files once, sequentially in 8 MiB blocks, from the disk (`cold`:
    evicted first) or from the page cache (read once before)."""
    if cold:
        evict(folder)
    else:
        read_speed(folder, cold=True)
    total, started = 0, time.perf_counter()
    for path in checkpoint_files(folder):
        with open(path, "rb", buffering=0) as f:
            while True:
                block = f.read(8 * MiB)
                if not block:
                    break
                total += len(block)
    return total / (time.perf_counter() - started)


def write_result(result: dict, json_path, quick: bool, name: str) -> None:
    """`result` as JSON to `json_path`, else (a full run, not --quick) to benchmarks/results/`name`."""
    path = json_path or (None if quick else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name))
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")


def save_random_llama(folder: str, **config) -> int:
    """A random Llama (seed 0) of LlamaConfig `config`, saved in bf16 (safetensors); returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=256, **config))
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())
