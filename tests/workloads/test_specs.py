"""Workload specs: validation, parsing, capping, keys, and the presets' reference shapes."""

from __future__ import annotations

import dataclasses

import pytest

from workloads import presets
from workloads.specs import (IndexDistribution, PoolingDistribution, SpecError, TableSpec,
                             WorkloadSpec)


def _spec(**changes) -> WorkloadSpec:
    fields = dict(name="t", tables=(TableSpec(100, 4), TableSpec(50, 4)), num_dense=3,
                  bottom_mlp=(8, 4), top_mlp=(6, 1), interaction="dot", batch_size=8)
    fields.update(changes)
    return WorkloadSpec(**fields)


# ---------------------------------------------------------------- validation

def test_valid_spec_builds():
    spec = _spec()
    assert spec.dim == 4
    assert spec.num_features == 3
    assert spec.total_rows == 150


@pytest.mark.parametrize("rows, dim, words", [
    (0, 4, "rows"), (-5, 4, "rows"), (10, 0, "dim"), (10, -1, "dim"),
])
def test_table_rejects_bad_rows_and_dim(rows, dim, words):
    with pytest.raises(SpecError, match=words):
        TableSpec(rows, dim)


@pytest.mark.parametrize("changes, words", [
    ({"tables": ()}, "at least one table"),
    ({"tables": (TableSpec(10, 4), TableSpec(10, 8))}, "share one dim"),
    ({"bottom_mlp": (8, 5)}, "bottom MLP must end at the embedding dim 4"),
    ({"top_mlp": (6, 2)}, "top MLP must end in 1"),
    ({"interaction": "bilinear"}, "interaction 'bilinear'"),
    ({"num_dense": 0}, "num_dense"),
    ({"batch_size": 0}, "batch size"),
    ({"bottom_mlp": ()}, "at least one layer"),
    ({"top_mlp": (0, 1)}, "widths must be >= 1"),
    ({"name": ""}, "name"),
])
def test_workload_validation_errors(changes, words):
    with pytest.raises(SpecError, match=words):
        _spec(**changes)


def test_spec_error_is_a_value_error_and_specs_are_frozen():
    assert issubclass(SpecError, ValueError)
    spec = _spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.batch_size = 3  # type: ignore[misc]


# ---------------------------------------------------------------- distributions

@pytest.mark.parametrize("text, kind, alpha", [
    ("uniform", "uniform", 0.0), ("zipf:1.05", "zipf", 1.05), ("zipf:2", "zipf", 2.0),
])
def test_index_distribution_parse(text, kind, alpha):
    parsed = IndexDistribution.parse(text)
    assert (parsed.kind, parsed.alpha) == (kind, alpha)
    assert IndexDistribution.parse(parsed.label()) == parsed


@pytest.mark.parametrize("text", ["zipf", "zipf:", "zipf:abc", "zipf:0", "zipf:-1", "zipf:nan",
                                  "uniform:3", "normal", "", "Uniform"])
def test_index_distribution_parse_rejects(text):
    with pytest.raises(SpecError):
        IndexDistribution.parse(text)


@pytest.mark.parametrize("text, kind, mean, spread", [
    ("32", "fixed", 32.0, 0.0),
    ("1", "fixed", 1.0, 0.0),
    ("uniform:10,4", "uniform", 10.0, 4.0),
    ("normal:20,5", "normal", 20.0, 5.0),
    ("lognormal:8,0.5", "lognormal", 8.0, 0.5),
    ("uniform:6", "uniform", 6.0, 0.0),
])
def test_pooling_parse(text, kind, mean, spread):
    parsed = PoolingDistribution.parse(text)
    assert (parsed.kind, parsed.mean, parsed.spread) == (kind, mean, spread)
    assert PoolingDistribution.parse(parsed.label()) == parsed


@pytest.mark.parametrize("text", ["0", "-3", "2.5", "abc", "", "gamma:3,1", "normal:abc",
                                  "normal:4,x", "uniform:0.5,0", "normal:4,-1"])
def test_pooling_parse_rejects(text):
    with pytest.raises(SpecError):
        PoolingDistribution.parse(text)


def test_pooling_cap_defaults_to_four_times_mean():
    assert PoolingDistribution("normal", 10.0, 2.0).cap == 40
    assert PoolingDistribution("normal", 10.0, 2.0, maximum=15).cap == 15
    assert PoolingDistribution("fixed", 1.0).cap == 4


# ---------------------------------------------------------------- capping, keys

def test_capped_records_original_rows():
    spec = _spec(tables=(TableSpec(100, 4), TableSpec(50, 4), TableSpec(10, 4)))
    capped = spec.capped(40)
    assert [table.rows for table in capped.tables] == [40, 40, 10]
    assert [table.original_rows for table in capped.tables] == [100, 50, 0]
    assert [table.capped for table in capped.tables] == [True, True, False]
    assert capped.capped_tables() == 2
    assert spec.capped_tables() == 0
    # Capping again keeps the size before the first cap.
    twice = capped.capped(20)
    assert [table.original_rows for table in twice.tables] == [100, 50, 0]
    assert [table.rows for table in twice.tables] == [20, 20, 10]
    assert spec.capped(None) is spec
    assert spec.capped(1000) == spec
    with pytest.raises(SpecError, match="--max-rows"):
        spec.capped(0)


def test_key_is_stable_and_shape_sensitive():
    spec = _spec()
    assert spec.key() == _spec().key()
    assert len(spec.key()) == 12
    # The name is not a shape.
    assert _spec(name="other").key() == spec.key()
    different = [
        _spec(tables=(TableSpec(101, 4), TableSpec(50, 4))),
        _spec(tables=(TableSpec(100, 8), TableSpec(50, 8)), bottom_mlp=(8, 8)),
        _spec(tables=(TableSpec(100, 4, PoolingDistribution("fixed", 2.0)), TableSpec(50, 4))),
        _spec(num_dense=4),
        _spec(bottom_mlp=(9, 4)),
        _spec(top_mlp=(7, 1)),
        _spec(interaction="cat"),
        spec.with_distribution(IndexDistribution("zipf", 1.1)),
        spec.capped(60),
    ]
    keys = {other.key() for other in different}
    assert spec.key() not in keys
    assert len(keys) == len(different)


def test_with_batch_size_and_distribution():
    spec = _spec()
    assert spec.with_batch_size(None) is spec
    assert spec.with_batch_size(32).batch_size == 32
    zipf = spec.with_distribution(IndexDistribution("zipf", 1.2))
    assert all(table.distribution.label() == "zipf:1.2" for table in zipf.tables)
    assert spec.with_distribution(None) is spec


def test_interaction_width():
    kaggle = presets.kaggle()
    assert kaggle.interaction_width == 16 + 27 * 26 // 2 == 367
    assert presets.terabyte().interaction_width == 128 + 27 * 26 // 2 == 479
    assert _spec(interaction="cat").interaction_width == 4 * 3


# ---------------------------------------------------------------- presets

def test_kaggle_shapes():
    spec = presets.preset("kaggle")
    rows = [table.rows for table in spec.tables]
    assert len(rows) == 26
    assert sum(rows) == 33_762_577
    assert rows[2] == 10_131_227
    assert rows[0] == 1460 and rows[-1] == 142_572
    assert max(rows) == 10_131_227 and min(rows) == 3
    assert spec.dim == 16
    assert spec.num_dense == 13
    assert spec.bottom_mlp == (512, 256, 64, 16)
    assert spec.top_mlp == (512, 256, 1)
    assert spec.interaction == "dot"
    assert all(table.pooling == PoolingDistribution("fixed", 1.0) for table in spec.tables)
    assert spec.largest_table() == 2


def test_terabyte_shapes():
    spec = presets.preset("terabyte")
    rows = [table.rows for table in spec.tables]
    assert len(rows) == 26 and spec.dim == 128
    assert max(rows) <= 40_000_000
    assert rows[0] == 39_884_406 and rows[19] == 39_979_771
    assert sum(rows) == 187_767_399
    assert spec.bottom_mlp == (512, 256, 128)
    assert spec.top_mlp == (1024, 1024, 512, 256, 1)
    ten = presets.preset("terabyte-10m")
    assert len(ten.tables) == 26 and ten.dim == 64
    assert max(table.rows for table in ten.tables) <= 10_000_000
    assert ten.bottom_mlp == (512, 256, 64) and ten.top_mlp == (512, 512, 256, 1)
    assert ten.interaction_width == 415


def test_mlperf_shapes():
    spec = presets.preset("mlperf")
    assert len(spec.tables) == 26 and spec.dim == 128
    lookups = sum(table.pooling.mean for table in spec.tables)
    assert lookups == 214
    assert max(table.pooling.mean for table in spec.tables) == 100
    assert sum(table.rows == 40_000_000 for table in spec.tables) == 5
    assert spec.interaction == "dcn"
    assert spec.bottom_mlp == (512, 256, 128)
    assert spec.top_mlp == (1024, 1024, 512, 256, 1)


@pytest.mark.parametrize("name, tables, rows, dim, pooling, num_dense, bottom, top", [
    ("dlrm-default", 8, 1_000_000, 64, 100, 512, (512, 64), (1024, 1024, 1024, 1)),
    ("rm1", 8, 4_000_000, 32, 80, 128, (64, 32), (256, 64, 1)),
    ("rm2", 32, 500_000, 64, 120, 256, (128, 64), (128, 64, 1)),
    ("rm3", 10, 2_000_000, 32, 20, 2560, (1024, 256, 32), (512, 256, 1)),
    ("smoke", 3, None, 8, 4, 4, (16, 8), (16, 1)),
])
def test_equal_table_presets(name, tables, rows, dim, pooling, num_dense, bottom, top):
    spec = presets.preset(name)
    assert len(spec.tables) == tables
    if rows is not None:
        assert {table.rows for table in spec.tables} == {rows}
    assert spec.dim == dim
    assert {table.pooling.mean for table in spec.tables} == {pooling}
    assert spec.num_dense == num_dense
    assert spec.bottom_mlp == bottom and spec.top_mlp == top
    assert spec.name == name


def test_every_preset_is_valid_and_named():
    for name, factory in presets.PRESETS.items():
        spec = factory()
        assert spec.name == name
        assert spec.description and spec.source


def test_unknown_preset_lists_valid_names():
    with pytest.raises(SpecError) as error:
        presets.preset("kagle")
    message = str(error.value)
    assert "kagle" in message
    for name in presets.PRESETS:
        assert name in message
    assert "synthetic" in message and "criteo:PATH" in message


def test_synthetic():
    pooling = PoolingDistribution.parse("lognormal:8,0.5")
    spec = presets.synthetic(1000, 16, pooling, 3, IndexDistribution("zipf", 1.1))
    assert len(spec.tables) == 3 and spec.dim == 16 and spec.bottom_mlp[-1] == 16
    assert all(table.rows == 1000 and table.pooling == pooling for table in spec.tables)
    assert all(table.distribution.kind == "zipf" for table in spec.tables)
    with pytest.raises(SpecError, match="--num-tables"):
        presets.synthetic(1000, 16, pooling, 0, IndexDistribution())


def test_specs_round_trip_through_json_with_every_field():
    import json

    from workloads.presets import PRESETS
    from workloads.specs import IndexDistribution, PoolingDistribution, TableSpec, WorkloadSpec

    for name, factory in PRESETS.items():
        spec = factory()
        assert WorkloadSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec, name
    table = TableSpec(rows=10, dim=4, pooling=PoolingDistribution("normal", 3.0, 1.0),
                      distribution=IndexDistribution("hitrate", target_hit_rate=0.5,
                                                     capacity_rows=4), original_rows=99)
    assert TableSpec.from_dict(json.loads(json.dumps(table.to_dict()))) == table


def test_spec_from_dict_refuses_unknown_and_missing_fields():
    from workloads.specs import SpecError, TableSpec

    with pytest.raises(SpecError, match="unknown field.*colour"):
        TableSpec.from_dict({"rows": 10, "dim": 4, "colour": "red"})
    with pytest.raises(SpecError, match="missing field.*dim"):
        TableSpec.from_dict({"rows": 10})
