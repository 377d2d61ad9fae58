"""The fingerprint: which host and policy facts it hashes, and the spin-loop clock in env.json."""

import dataclasses

import pytest

from bench.run import clock, devices
from bench.run.timing import TimingPolicy

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 8
flags\t\t: fpu avx2

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
stepping\t: 2
"""


def test_cpu_identity_is_read_from_the_first_processor():
    assert devices.parse_cpu_identity(CPUINFO) == {
        "cpu_vendor": "GenuineIntel", "cpu_family": "6", "cpu_model_number": "143",
        "cpu_stepping": "8"}


def test_facts_hold_what_decides_speed():
    facts = devices.fingerprint_facts("cpu", "avx2", 1, TimingPolicy())
    for name in ("cpu_model", "cpu_vendor", "cpu_family", "cpu_model_number", "cpu_stepping",
                 "l1d_bytes", "l2_bytes", "l3_bytes", "logical_cpus", "physical_cores",
                 "memory_total_gib", "torch_version", "device", "isa", "threads"):
        assert name in facts, name
    assert facts["timing_policy"] == dataclasses.asdict(TimingPolicy())
    assert facts["isa"] == "avx2" and facts["threads"] == 1


@pytest.fixture
def host(monkeypatch):
    """A host with known facts; returns a function that changes one of them."""
    base = {"cpu_model": "Intel(R) Xeon(R) Processor", "cpu_vendor": "GenuineIntel",
            "cpu_family": "6", "cpu_model_number": "143", "cpu_stepping": "8",
            "l1d_bytes": 48 << 10, "l2_bytes": 2 << 20, "l3_bytes": 105 << 20,
            "logical_cpus": 2, "physical_cores": 1, "memory_total_gib": 24,
            "torch_version": "2.13.0+cpu"}
    monkeypatch.setattr(devices, "device_name", lambda device: "Intel(R) Xeon(R) Processor")

    def with_facts(**changes):
        monkeypatch.setattr(devices, "_host_speed_facts", lambda: {**base, **changes})
        return devices.fingerprint("cpu", "native", 1, TimingPolicy())

    return with_facts


@pytest.mark.parametrize("change", [
    {"l3_bytes": 480 << 20}, {"l2_bytes": 1 << 20}, {"l1d_bytes": 32 << 10},
    {"cpu_model_number": "207"}, {"cpu_stepping": "2"}, {"cpu_family": "25"},
    {"cpu_vendor": "AuthenticAMD"}, {"physical_cores": 2}, {"logical_cpus": 4},
    {"memory_total_gib": 48}, {"torch_version": "2.12.0+cpu"},
])
def test_each_fact_changes_the_fingerprint(host, change):
    # The brand string is the same on both sides: the old fingerprint hashed alike here.
    assert host(**change) != host()


def test_same_facts_give_the_same_fingerprint(host):
    assert host() == host()


def test_timing_policy_is_part_of_the_fingerprint():
    default = devices.fingerprint("cpu", "native", 1, TimingPolicy())
    assert devices.fingerprint("cpu", "native", 1, TimingPolicy(min_run_time_s=0.3)) != default
    assert devices.fingerprint("cpu", "native", 1, TimingPolicy(warmup_calls=0)) != default
    # The worker rebuilds the policy from JSON; a dict of the same fields hashes alike.
    assert devices.fingerprint("cpu", "native", 1, dataclasses.asdict(TimingPolicy())) == default
    assert devices.fingerprint("cpu", "native", 2, TimingPolicy()) != default
    assert devices.fingerprint("cpu", "avx2", 1, TimingPolicy()) != default


def test_fingerprint_records_key_each_configurations_facts_by_its_fingerprint():
    policy = TimingPolicy(min_run_time_s=0.2)
    records = devices.fingerprint_records([("cpu", "native", 1), ("cpu", "avx2", 1),
                                           ("cpu", "native", 1)], policy)
    assert len(records) == 2
    for fingerprint, facts in records.items():
        assert devices.fingerprint(facts["device"], facts["isa"], facts["threads"],
                                   policy) == fingerprint
        assert devices.fingerprint_of_facts(facts) == fingerprint


spin_runs = pytest.mark.skipif(
    devices.platform.machine().lower() not in ("x86_64", "amd64"),
    reason="the spin loop is x86-64 machine code")


@spin_runs
def test_spin_loop_runs_the_add_chain_it_claims():
    spin = clock.SpinLoop()
    for iterations in (1, 7, 1000):
        assert spin(iterations) == clock.expected_spin_result(iterations)
    with pytest.raises(ValueError):
        spin(0)


@spin_runs
def test_effective_clock_is_cycles_over_the_fastest_run():
    calls = []

    def fake_measure(function, runs):
        calls.append(runs)
        function()
        return [0.5, 0.02, 0.03]

    result = clock.effective_clock(measure=fake_measure, iterations=1000, runs=3)
    assert calls == [3]
    assert result["effective_clock_hz"] == pytest.approx(1000 * clock.ADDS_PER_ITERATION / 0.02)
    assert result["best_seconds"] == 0.02 and "1 cycle" in result["assumption"]


@spin_runs
def test_spin_code_that_does_not_match_its_cycle_count_is_refused(monkeypatch):
    # Planted fault: one add fewer than ADDS_PER_ITERATION says, so cycles would be overstated.
    code = clock.spin_code()
    add = bytes.fromhex("4801d0")
    shorter = code.replace(add, b"", 1)
    shorter = shorter[:-2] + bytes([(shorter[-2] + 3) & 0xFF]) + shorter[-1:]  # re-aim jnz
    monkeypatch.setattr(clock, "spin_code", lambda: shorter)
    result = clock.effective_clock(measure=lambda function, runs: [1.0], iterations=100)
    assert result["effective_clock_hz"] is None and "wrong value" in result["reason"]


def test_effective_clock_gives_a_reason_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(clock.platform, "machine", lambda: "aarch64")
    result = clock.effective_clock(measure=lambda function, runs: [1.0])
    assert result["effective_clock_hz"] is None and "x86-64" in result["reason"]


def test_report_shows_the_clock_and_which_libraries_are_unverified(tmp_path):
    from bench.records import ResultRow
    from reports.runs import Run, rows_to_frame
    from reports.tables import run_facts_table

    rows = [ResultRow(task_key="a", op="sls", impl="x", status="ok", isa="avx2",
                      isa_effective="aten=avx2;mkl=avx2(unverified);onednn=not-used;"
                                    "fbgemm=avx2")]
    env = {"effective_clock": {"effective_clock_hz": 2.61e9, "method": "spin loop"}}
    table = run_facts_table(Run(tmp_path, "run", rows_to_frame(rows), env, {}))
    facts = dict(zip(table["fact"], table["value"]))
    assert facts["effective clock (spin loop, one core)"] == "2.61 GHz"
    assert "(mkl: unverified" in facts["isa_effective"]
    assert "fbgemm" not in facts["isa_effective"].split("(")[-1]
    unmeasured = {"effective_clock": {"effective_clock_hz": None, "reason": "no PROT_EXEC"}}
    table = run_facts_table(Run(tmp_path, "run", rows_to_frame(rows), unmeasured, {}))
    assert "not measured: no PROT_EXEC" in set(table["value"])
