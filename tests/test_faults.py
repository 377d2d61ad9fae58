"""Planted faults: each acts only at its own site, configuration, rank and visit."""

from __future__ import annotations

import pytest

from bench import faults
from bench.faults import CRASH, SCALE, PlantedFault, PlantedFaultError


def test_a_crash_fires_only_where_it_was_planted():
    fault = PlantedFault("dist.checking", CRASH, task_key="k1", rank=1)
    for elsewhere in ({"site": "dist.building", "task_key": "k1", "rank": 1},
                      {"site": "dist.checking", "task_key": "k2", "rank": 1},
                      {"site": "dist.checking", "task_key": "k1", "rank": 0}):
        assert faults.trigger(fault, **elsewhere) == 1.0
    with pytest.raises(PlantedFaultError, match="planted crash at dist.checking"):
        faults.trigger(fault, "dist.checking", task_key="k1", rank=1)
    assert faults.trigger(None, "dist.checking", task_key="k1", rank=1) == 1.0


def test_a_scale_is_returned_and_a_visit_count_is_honoured():
    assert faults.trigger(PlantedFault("dist.embedding_lr", SCALE, value=2.0),
                          "dist.embedding_lr", task_key="any", rank=3) == 2.0
    fifth = PlantedFault.parse("serve.batch:scale:5")
    assert [faults.trigger(fifth, "serve.batch", visit=visit) for visit in range(7)] == [1.0] * 7
    fifth = PlantedFault("serve.batch", SCALE, after=5, value=0.5)
    assert [faults.trigger(fifth, "serve.batch", visit=visit) for visit in range(7)] == \
        [1.0] * 5 + [0.5, 1.0]


def test_specs_round_trip_and_typos_are_refused():
    fault = PlantedFault("dist.building", "hang", task_key="k", rank=0)
    assert PlantedFault.from_dict(fault.to_dict()) == fault
    assert PlantedFault.from_dict(None) is None
    assert PlantedFault.parse("serve.batch:exit:5") == PlantedFault("serve.batch", "exit",
                                                                     after=5)
    for text in ("serve.batch", "serve.batch:explode", "serve.bat:exit", "serve.batch:exit:x"):
        with pytest.raises(ValueError):
            PlantedFault.parse(text)
    with pytest.raises(ValueError, match="unknown fault site"):
        faults.trigger(None, "dist.chekcing")
