"""The default service's speed table of this CPU: when a kept one is trusted, when it is taken again."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from policies.tables import SpeedFile, read_table
from router import defaults
from router.config import WorkerSettings
from workers import profiling

FOLDER = defaults.default_checkpoint()
# /proc/stat's aggregate line: user nice system idle iowait irq softirq steal guest guest_nice (clock ticks)
STAT = "cpu  1000 50 250 9000 40 5 15 30 0 0\ncpu0 500 25 125 4500 20 2 7 15 0 0\nintr 12345\n"


def test_busy_seconds_count_every_state_but_idle_and_iowait():
    ticks = profiling.os.sysconf("SC_CLK_TCK")
    assert profiling.cpu_busy_seconds(STAT) == pytest.approx((1000 + 50 + 250 + 5 + 15 + 30) / ticks)
    with pytest.raises(ValueError, match="not a /proc/stat"):
        profiling.cpu_busy_seconds("intr 12345\n")


def test_other_load_excludes_this_process_own_work():
    others = profiling.OtherLoad()
    end = time.process_time() + 0.2
    while time.process_time() < end:  # busy here: none of it is "other"
        pass
    cpus = others.cpus()
    if not Path("/proc/stat").exists():
        assert cpus is None
    else:
        assert cpus is not None and cpus >= 0


def kept_table(tmp_path: Path, name: str = "speed.json", **changes) -> Path:
    """The shipped CPU table, fingerprinted as if profiled here by this code, with ``changes`` applied."""
    data = json.loads((FOLDER / "speed-cpu.json").read_text())
    with defaults._worker_threads():
        here = profiling.device_name(profiling.resolve_device("cpu"))
    data["fingerprint"].update(model_sha256=profiling.checkpoint_sha256(FOLDER), software=profiling.software(),
                               device=here)
    data["measurement"].update(cache_fill=profiling.CACHE_FILL, other_cpus=0.1, decode_timing=profiling.DECODE_TIMING)
    data.setdefault("engine_ms", [2.5] * len(data["batches"]))  # as this code's profile measures it
    data["prefill_chunk"] = WorkerSettings().max_prefill_tokens  # timed in the chunks the workers run
    if changes.pop("engine_ms__absent", False):
        del data["engine_ms"]
    if chunk := changes.pop("other_prefill_chunk", None):  # another chunk than the workers'
        data["prefill_chunk"] = chunk
    for key, value in changes.items():
        section, field = key.split("__")
        data[section][field] = value
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_a_table_taken_here_by_this_code_on_a_quiet_machine_is_kept(tmp_path):
    table, why = defaults._kept_profile(FOLDER, kept_table(tmp_path))
    assert why is None and table.measurement.other_cpus == 0.1


@pytest.mark.parametrize("changes, reason", [
    (dict(fingerprint__model_sha256="0" * 64), "another build of the checkpoint"),
    (dict(fingerprint__device="cpu: Intel 8086 (1 threads)"), "measured on cpu: Intel 8086"),
    (dict(fingerprint__software="supernet-router 0.0.1, torch 1.0"), "other software (supernet-router 0.0.1"),
    (dict(measurement__cache_fill="random keys written into per-sequence caches"), "other software"),
    (dict(engine_ms__absent=True), "predates the engine's own step time"),
    (dict(measurement__decode_timing=None), "timed one layer alone"),
    (dict(other_prefill_chunk=64), "timed prefill in chunks of 64 tokens, the workers run 256"),
])
def test_a_table_that_no_longer_describes_this_machine_or_code_is_taken_again(tmp_path, changes, reason):
    table, why = defaults._kept_profile(FOLDER, kept_table(tmp_path, **changes))
    assert table is None and reason in why


def test_a_table_taken_beside_other_work_is_taken_again_but_kept_until_a_quieter_one_exists(tmp_path):
    path = kept_table(tmp_path, measurement__other_cpus=1.7)
    table, why = defaults._kept_profile(FOLDER, path)
    assert table is not None and "1.7 CPUs busy" in why
    quiet = read_table(kept_table(tmp_path, "quiet.json", measurement__other_cpus=0.2), SpeedFile)
    busier = read_table(kept_table(tmp_path, "busier.json", measurement__other_cpus=1.9), SpeedFile)
    assert defaults._quieter(quiet, table) and not defaults._quieter(busier, table)


def test_missing_and_unreadable_tables_are_taken_again(tmp_path):
    assert defaults._kept_profile(FOLDER, tmp_path / "absent.json") == (None, "first run")
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "supernet-router/speed", "version": 1}')
    table, why = defaults._kept_profile(FOLDER, broken)
    assert table is None and why.startswith("the kept table is unreadable")


def test_the_table_is_timed_with_the_threads_a_default_worker_runs():
    import torch

    from router.config import WorkerSettings

    before = torch.get_num_threads()
    with defaults._worker_threads():
        assert torch.get_num_threads() == max(1, int(WorkerSettings().num_cpus))
    assert torch.get_num_threads() == before
