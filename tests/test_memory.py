"""`hybridtrt.memory`: the least of the known limits, and a refusal that names needed vs available."""

from __future__ import annotations

import pytest

from hybridtrt import memory
from hybridtrt.errors import InputError


def test_the_least_limit_wins_and_is_named(monkeypatch):
    monkeypatch.setattr(memory, "_meminfo", lambda field: 8 * 2**30)
    monkeypatch.setattr(memory, "_cgroup_room", lambda: 3 * 2**30)
    monkeypatch.setattr(memory, "_rlimit_room", lambda: None)
    monkeypatch.delenv(memory.ENV, raising=False)
    assert memory.available_memory() == memory.Available(3 * 2**30, "the cgroup's memory.max less its usage")
    monkeypatch.setenv(memory.ENV, "512M")
    assert memory.available_memory() == memory.Available(512 * 2**20, memory.ENV)
    with pytest.raises(InputError, match=r"needs 1\.0 GiB of memory; 512\.0 MiB is available \(HYBRIDTRT_MEMORY_LIMIT\)"):
        memory.check_memory(2**30, what="x", fix="y")
    memory.check_memory(512 * 2**20, what="x", fix="y")  # exactly what there is: fine


def test_a_bad_override_is_a_typed_error(monkeypatch):
    monkeypatch.setenv(memory.ENV, "lots")
    with pytest.raises(InputError, match="HYBRIDTRT_MEMORY_LIMIT='lots' is not a size"):
        memory.available_memory()


def test_this_machine_reports_something():
    room = memory.available_memory()
    assert room.nbytes is None or room.nbytes >= 0
