"""The Megatron backend's launches, one per number of processes and shared by every test here (each launch runs
several parallel layouts one after the other in the same processes: tests/megatron/parallel_worker.py).

megatron-core runs only in launched processes: its CPU shims (cpu_shims.py) patch torch, which must never happen
in the pytest process."""
import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "parallel_worker.py")
HAS_MEGATRON = (importlib.util.find_spec("megatron") is not None
                and importlib.util.find_spec("megatron.core") is not None)

# What each launch runs: layout/importance pairs (layout: tp<T>[pp<P>][vp<V>][L<layers>][sp][-plain], the rest of the
# world data parallel; parallel_worker.parse_layout), the layouts also stopped and resumed, the export check's
# layout, the Megatron-vs-HF sequence-parallel settings.
LAUNCHES = {
    1: {"runs": "tp1/score,tp1/norm,tp1L4/score", "resume": "tp1", "export": "tp1", "hf_checks": "off"},
    2: {"runs": "tp2sp/score,tp2/norm,tp1/score,tp1/norm,tp1-plain/norm,tp2-plain/score,tp1pp2/norm,"
                "tp1pp2vp2L4/score", "resume": "tp1", "export": "tp2sp", "hf_checks": "off,on"},
    4: {"runs": "tp2sp/score,tp2pp2sp/score,tp1pp2/score", "resume": "tp2pp2sp", "export": "tp2pp2sp"},
}
_results = {}


def megatron_launch(nproc: int) -> dict:
    """The JSON of the launch with `nproc` processes (run once per session)."""
    if nproc not in _results:
        from beamlora_ds.testing.launcher import launch_for_json

        args = [x for key, value in LAUNCHES[nproc].items() if value for x in (f"--{key}", value)]
        _results[nproc] = launch_for_json(WORKER, args, "--out", nproc=nproc, timeout=600)
    return _results[nproc]


@pytest.fixture
def megatron_installed():
    """Skips the test where megatron-core is not installed (a fixture, not an import of this conftest: another
    folder's conftest.py may be the module `conftest` when the whole suite runs)."""
    if not HAS_MEGATRON:
        pytest.skip("megatron-core is not installed (pip install .[megatron])")


@pytest.fixture
def launched(megatron_installed):
    return megatron_launch
