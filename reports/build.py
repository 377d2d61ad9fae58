"""Build a report directory (index.html, summary.md, figure PNGs) from run directories."""

from __future__ import annotations

import argparse
import datetime
import re
from html import escape
from pathlib import Path
from typing import Callable

import pandas as pd
from matplotlib.figure import Figure

from bench.records import write_atomic
from reports import (canvas, cells, comparison, device_roofs, device_runs, dist, glance,
                     headline, order, phases, plots, roofline, roofline_plot, roofs, runs,
                     serving, tables, values, workingset)
from reports.compare import DEFAULT_ALPHA, DEFAULT_FACTOR
from reports.html import FigureBlock, NoteBlock, Section, TableBlock, render_page

REPORT_TITLE = "dlrm-bench report"
FIGURE_PREFIX = "fig-"
EFFICIENCY_COLUMNS = ["device", "isa", "op", "impl", "workload", "precision", "threads",
                      "batch_size", "intensity", "achieved_gflops", "achieved_gbps",
                      "working_set", "roof", "roof_gbps", "attainable_gflops", "roof_precision",
                      "efficiency", "probe_spread", "limit", "bound", "note"]
LATENCY_COLUMNS = ["op", "impl", "precision", "device", "isa", "threads", "workload",
                   "median_s", "p90_s", "p99_s", "n_samples", "calls_per_sample", "percentiles_of"]


def slug(text: str) -> str:
    """File-name-safe lower-case text."""
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "default"


def unique_labels(directories: list[Path]) -> list[str]:
    """Run labels from directory names, numbered where two runs share a name."""
    labels = []
    for index, directory in enumerate(directories):
        label = directory.resolve().name or f"run{index + 1}"
        labels.append(label if label not in labels else f"{label} ({index + 1})")
    return labels


def figure_block(name: str, caption: str, draw: Callable[[], Figure]) -> FigureBlock | NoteBlock:
    """Draw one figure, or a note saying why it is absent."""
    try:
        figure = draw()
    except canvas.NoData as reason:
        return NoteBlock(f"Figure skipped ({caption}): {reason}.")
    except Exception as failure:  # one broken figure must not cost the whole report
        return NoteBlock(f"Figure failed ({caption}): {type(failure).__name__}: {failure}")
    return FigureBlock(f"{FIGURE_PREFIX}{name}.png", canvas.figure_to_png(figure), caption)


def table_or_note(title: str, table: pd.DataFrame, empty_note: str) -> TableBlock | NoteBlock:
    """The table, or a note when it has no rows."""
    return TableBlock(title, table) if not table.empty else NoteBlock(empty_note)


def glance_section(run: runs.Run, analysis: device_runs.Analysis, roofline_rows: pd.DataFrame,
                   op_order: dict[str, float]) -> Section:
    """What a reader came for: the best whole model against the reference, and the roofline."""
    frame = analysis.frame
    blocks = [NoteBlock(glance.run_line(run))]
    devices = device_runs.device_line(frame, analysis.added)
    if devices:
        blocks.append(NoteBlock(devices))
    models = glance.best_model_table(frame, op_order)
    if models.empty:
        models_named = ", ".join(glance.WHOLE_MODEL_OPS)
        blocks.append(NoteBlock(f"No measured whole-model rows ({models_named}) in this run: "
                                "see the Summary for the best of each op."))
    else:
        blocks += [NoteBlock(glance.model_line(models)), TableBlock(
            "Best whole-model samples/s per workload and device; vs_reference = that speed over "
            f"{headline.HEADLINE_REFERENCE_IMPL} in the same slot (workload, variant, batch, "
            "device, ISA level, threads), blank where the reference did not run there", models)]
    placement = glance.placement_table(frame, roofline_rows, op_order)
    if placement.empty:
        blocks.append(NoteBlock("No op shares a (device, isa) group with measured ceilings "
                                "(membw, gemm_peak): nothing is placed on the roofline."))
    else:
        blocks += [NoteBlock(glance.placement_line(placement)), TableBlock(
            "Best configuration per op on the roofline: efficiency = share of the roof its "
            "working set meets; bound = memory below the ridge intensity, compute above it",
            placement)]
    return Section("At a glance", "glance", blocks)


def run_section(loaded: list[runs.Run]) -> Section:
    """Host facts, arguments and row counts of every run, folded away."""
    blocks = [TableBlock(f"Run {run.label}: host facts, arguments and row counts",
                         tables.run_facts_table(run), folded=True) for run in loaded]
    return Section("Runs", "runs", blocks)


def summary_section(frame: pd.DataFrame, roofline_rows: pd.DataFrame,
                    op_order: dict[str, float]) -> Section:
    """Best configuration per op and workload."""
    summary = tables.summary_table(frame, roofline_rows, op_order)
    return Section("Summary", "summary", [
        table_or_note("Best configuration per op, workload and device (noise = IQR / median; "
                      "efficiency against the roofline; joules_per_sample and avg_power_w from "
                      "NVML or RAPL, 'not measured' where the row has none)", summary,
                      "No measured op rows."),
    ])


def headline_section(frame: pd.DataFrame, op_order: dict[str, float]) -> Section:
    """Whole models and batched lookups: every impl against the baseline and the reference."""
    table = headline.headline_table(frame, op_order)
    return Section("Headline: every impl against the baseline and the public reference",
                   "headline", [
        table_or_note(
            f"Per workload, every impl of {', '.join(headline.HEADLINE_OPS)} at each precision",
            table, "No measured dlrm_train, dlrm_infer or sls_multi rows."),
        NoteBlock(
            "joules_per_sample = avg_power_w (the row's average power over its timed "
            "repetitions) x median_s / samples per call; the power is NVML's energy counter on "
            "a GPU (the whole board) and RAPL package energy on a CPU where readable (the whole "
            "package, other processes included); 'not measured' where the row has no energy "
            "figure."),
        NoteBlock(
            "vs_baseline = median_s of the op's baseline impl (column baseline) at the same "
            "precision / this row's median_s; vs_reference = median_s of "
            f"{headline.HEADLINE_REFERENCE_IMPL} (the public DLRM reference, "
            "`run_bench.py reference`, fp32 only) / this row's median_s, at every precision; "
            "above 1 is faster. Rows are compared within one workload, variant, batch size, "
            "device, ISA level and thread count; blank where that row is absent."),
    ])


def roofline_group_blocks(ceilings: roofs.Ceilings, points: pd.DataFrame,
                          op_order: dict[str, float]) -> list:
    """The figure of one (device, isa) group and a note on rows it cannot place."""
    name = f"roofline-{slug(ceilings.device)}-{slug(ceilings.isa)}"
    caption = f"Roofline, device {ceilings.device}, isa {ceilings.isa}"
    blocks = [figure_block(name, caption,
                           lambda: roofline_plot.roofline_figure(ceilings, points, op_order))]
    unplaced = int((~values.positive_mask(points["intensity"])).sum())
    if unplaced:
        blocks.append(NoteBlock(
            f"{unplaced} row(s) of {ceilings.device}/{ceilings.isa} have no arithmetic "
            "intensity (no flops by formula): not drawn, efficiency = GB/s against their roof."))
    return blocks


def roofline_section(ceilings_by_group: dict, roofline_rows: pd.DataFrame,
                     op_order: dict[str, float]) -> Section:
    """Ceilings, roofline figures, efficiency and memory/compute classification."""
    section = Section("Roofline", "roofline")
    if not ceilings_by_group:
        section.blocks.append(NoteBlock(
            "No machine-ceiling rows (op membw or gemm_peak) in this run: roofline, "
            "efficiency and memory/compute classification skipped."))
        return section
    # One table per device: a CPU's and a GPU's roofs are never one group.
    for device, table in roofs.ceilings_table(ceilings_by_group).groupby("device", sort=False):
        section.blocks.append(TableBlock(f"Machine ceilings, device {device}", table))
    gpus = {device: (group.cache_bytes, group.cache_source)
            for (device, _), group in ceilings_by_group.items() if device_roofs.is_gpu(device)}
    if gpus:
        section.blocks.append(NoteBlock(device_roofs.gpu_roofline_note(list(gpus), gpus)))
    for key, ceilings in ceilings_by_group.items():
        points = roofline_rows[(roofline_rows["device"] == key[0])
                               & (roofline_rows["isa"] == key[1])]
        if not points.empty:
            section.blocks += roofline_group_blocks(ceilings, points, op_order)
    section.blocks.append(NoteBlock(
        "Efficiency = achieved GFLOP/s / min(compute peak, memory roof x intensity), or GB/s / "
        "memory roof without flops. Each row is placed under the memory roof its working set "
        f"meets: '{roofs.IN_CACHE_ROOF}' (the best membw stream buffer within the "
        "last-level cache) when the working set fits in the LLC of env.json, else "
        f"'{roofs.GATHER_ROOF}' (random rows of the nearest row size from a buffer beyond "
        f"the LLC) for lookups, else '{roofs.DRAM_ROOF}' (the largest membw buffer); a "
        "working set between the LLC and that probe's buffer is partly cached and bounded by "
        "the in-cache roof. limit says whether the compute peak or the memory roof binds. "
        "Working set: the table for lookups (at most what their rotating batches read), the "
        "model for whole-model ops, else the bytes one call moves. The compute peak is the "
        "gemm_peak of the row's precision, else the highest peak measured."))
    for note, text in (
            (roofline.WITHIN_SPREAD_NOTE,
             "sit above their roof's median but within the probe's own spread ({ops}): "
             "probe_spread is how much faster than its median the probe's fastest sample ran, "
             "so these rows are at the roof, not beyond it."),
            (roofline.ABOVE_ROOF_NOTE,
             "exceed their roof by more than the probe's own spread ({ops}): the kernel beats "
             "the run's own probe of that roof (gemm_peak for a compute limit, membw for a "
             "memory one; skewed indices also reuse cached rows that a uniform gather probe "
             "does not), so the probe understates the machine there, or, on a shared host, the "
             "probe's process ran slower than the kernel's (--replicates K takes each roof as "
             "the best of K processes); they are labelled, not hidden.")):
        labelled = roofline_rows[roofline_rows["note"] == note]
        if not labelled.empty:
            section.blocks.append(NoteBlock(
                f"{len(labelled)} row(s) " + text.format(ops=values.joined_unique(labelled["op"]))))
    section.blocks.append(table_or_note(
        "Efficiency per row", order.sort_report_rows(roofline_rows[EFFICIENCY_COLUMNS], op_order),
        "No measured op row shares a (device, isa) group with the ceilings."))
    section.blocks.append(table_or_note(
        "Memory- or compute-bound (intensity against the ridge point)",
        roofline.classification_table(roofline_rows, op_order), "Nothing to classify."))
    return section


def figure_section(title: str, anchor: str, block: FigureBlock | NoteBlock) -> Section:
    """A section holding a single figure (or its note)."""
    return Section(title, anchor, [block])


def latency_section(frame: pd.DataFrame, op_order: dict[str, float]) -> Section:
    """Per-sample time distributions, labelled with how many calls each sample averages."""
    rows = runs.measured_op_rows(frame)
    rows = rows[values.positive_mask(rows["median_s"])]
    table = rows.assign(percentiles_of=rows["calls_per_sample"].map(tables.sample_label))
    return Section("Latency distribution", "latency", [
        figure_block("latency", "Per-sample time distribution per op (CPU samples are block "
                     "means of N calls, see the table)",
                     lambda: plots.latency_figure(frame, op_order)),
        NoteBlock("On CPU, torch.utils.benchmark times blocks of calls: each sample, and so "
                  "p90_s and p99_s, is the mean of calls_per_sample calls, which hides the "
                  "spread of single calls. A sample is one call only where calls_per_sample "
                  "is 1 (CUDA rows, slow closures)."),
        table_or_note("Percentiles per row",
                      order.sort_report_rows(table[LATENCY_COLUMNS], op_order),
                      "No measured op rows with a median time."),
    ])


def precision_section(frame: pd.DataFrame, op_order: dict[str, float]) -> Section:
    """Accuracy cost against speed-up for every lower precision."""
    tradeoffs = tables.precision_tradeoffs(frame, op_order)
    return Section("Precision: error versus speed-up", "precision", [
        figure_block("precision", "Precision error versus speed-up over fp32",
                     lambda: plots.precision_figure(tradeoffs, op_order)),
        table_or_note("Lower precisions against the fastest fp32 row of the same configuration",
                      tradeoffs, "No lower-precision row has a matching fp32 row."),
    ])


def working_set_section(frame: pd.DataFrame, env: dict) -> Section:
    """sls bandwidth against table footprint, with cliffs set against the sysfs cache sizes."""
    section = Section("Working set: bandwidth versus table footprint", "working-set")
    simulated = workingset.simulated_misses_table(frame)
    if not simulated.empty:
        section.blocks.append(TableBlock(
            "SIMULATED cache misses per call (run_bench.py --metric instructions --cache-sim: "
            "Valgrind's callgrind cache model, not hardware counters, which these machines "
            "lack; under Valgrind the AVX2 code paths run)", simulated))
    sweep = workingset.sweep_rows(frame)
    if sweep.empty:
        section.blocks.append(NoteBlock(
            f"No sls footprint sweep in this run (sls at {workingset.MIN_SWEEP_POINTS} or more "
            "table sizes, e.g. --workload synthetic --rows 10000,1000000,100000000)."))
        return section
    cliffs = workingset.series_cliffs(sweep)
    section.blocks.append(figure_block(
        "working-set", "sls GB/s and samples/s versus table footprint",
        lambda: plots.working_set_figure(sweep, env, cliffs)))
    if not workingset.cache_levels(env):
        section.blocks.append(NoteBlock("env.json records no cache sizes (l1d_bytes, l2_bytes, "
                                        "l3_bytes): cliffs are not matched to cache levels."))
    section.blocks.append(table_or_note(
        f"Detected cliffs (bandwidth falls by more than "
        f"{workingset.CLIFF_THRESHOLD:.0%} between neighbouring footprints) against the sysfs "
        "cache sizes; cliff_over_cache = middle of the fall / cache size",
        workingset.cliffs_table(sweep, env), "No cliffs and no cache sizes to compare."))
    caps = sorted(set(sweep["loop_bytes"][values.finite_mask(sweep["loop_bytes"])]))
    if caps:
        section.blocks.append(NoteBlock(
            "The timed loop cycles through distinct batches (rotation_batches in params), which "
            f"together touch at most {', '.join(values.format_bytes(cap) for cap in caps)} of "
            "the table (batch x pooling rows x batches): a table larger than that is never "
            "touched whole, so cliffs beyond it come from the spread of the rows, not from "
            "the table's size."))
    return section


def comparison_blocks(first: runs.Run, second: runs.Run, op_order: dict[str, float]) -> list:
    """Figure, per-op summary and matched rows of one pair of runs (the checker's verdicts)."""
    matched, only_first, only_second = comparison.compare_runs(first, second, op_order)
    blocks = [NoteBlock(
        f"{second.label} against {first.label}: {len(matched)} matched row(s) (same task key); "
        f"{only_first} only in {first.label}, {only_second} only in {second.label}. "
        f"ratio = median_s({second.label}) / median_s({first.label}); verdicts as "
        f"`run_bench.py check` gives them (Mann-Whitney U on the raw samples, p < "
        f"{DEFAULT_ALPHA:g}, beyond a {DEFAULT_FACTOR * 100:g}% factor), here "
        "across hosts and code versions.")]
    if first.env.get("fingerprint") != second.env.get("fingerprint"):
        blocks.append(NoteBlock("The runs have different host fingerprints (hardware or "
                                "software differ): their ratios compare machines."))
    if matched.empty:
        return blocks
    if matched["code_changed"].any():
        blocks.append(NoteBlock("Some matched rows ran different impl code versions "
                                "(code_changed): their ratios mix code and machine effects."))
    blocks.append(figure_block(f"compare-{slug(second.label)}",
                               f"Median time ratio, {second.label} vs {first.label}",
                               lambda: plots.comparison_figure(matched, first.label,
                                                               second.label, op_order)))
    blocks.append(TableBlock(f"Per op: {second.label} vs {first.label}",
                             comparison.comparison_summary(matched, op_order)))
    renamed = matched.rename(columns={"median_s_a": f"median_s {first.label}",
                                      "median_s_b": f"median_s {second.label}"})
    blocks.append(TableBlock(f"Matched rows: {second.label} vs {first.label}", renamed))
    return blocks


def comparison_section(loaded: list[runs.Run], op_order: dict[str, float]) -> Section:
    """Every later run against the first one."""
    section = Section("Comparison across runs", "comparison")
    if len(loaded) < 2:
        section.blocks.append(NoteBlock("Only one run given: no comparison."))
    for other in loaded[1:]:
        section.blocks += comparison_blocks(loaded[0], other, op_order)
    return section


def wall_section(frame: pd.DataFrame, op_order: dict[str, float]) -> Section:
    """Where the workers' wall went, per op: set-up, checks, warm-up and timing."""
    return Section("Where the wall went", "wall", [
        table_or_note("Seconds per phase summed over each op's rows; timing_share = timing_s / "
                      "wall_s (worker start-up is not in any row)",
                      phases.phase_table(frame, op_order),
                      "No row of this run recorded its wall by phase (results before schema 3)."),
    ])


def problems_section(frame: pd.DataFrame, args: dict) -> Section:
    """Skipped and failed configurations with their reasons, and what the plan left out."""
    blocks = [table_or_note("Rows not measured, by reason", tables.problem_rows_table(frame),
                            "No skipped or failed rows.")]
    left_out = tables.left_out_table(args)
    if not left_out.empty:
        blocks.append(TableBlock(
            "Left out of the plan: configurations a default or the sweep's cross product could "
            "not pair here (no rows; name the impl with --impls, and the precision with "
            "--precision, to get a skip row)", left_out))
    return Section("Skipped and failed configurations", "problems", blocks)


def build_sections(loaded: list[runs.Run]) -> list[Section]:
    """All report sections: analysis of the first run (with the later runs' rows on devices
    it lacks), then comparisons with the others."""
    primary = loaded[0]
    analysis = device_runs.analysed_rows(loaded)
    frame = analysis.frame
    # Ops sort as the runs recorded their order (the first run recording an op decides).
    op_order = runs.merged_op_order(loaded)
    ceilings_by_group = roofs.group_ceilings(frame, primary.env, analysis.device_envs)
    roofline_rows = roofline.roofline_table(frame, ceilings_by_group)
    return [
        glance_section(primary, analysis, roofline_rows, op_order),
        run_section(loaded),
        summary_section(frame, roofline_rows, op_order),
        headline_section(frame, op_order),
        roofline_section(ceilings_by_group, roofline_rows, op_order),
        figure_section("Throughput by precision", "throughput", figure_block(
            "throughput", "Throughput by precision per op",
            lambda: plots.throughput_figure(frame, op_order))),
        figure_section("Speed-up by ISA level", "isa", figure_block(
            "isa-speedup", "Speed-up by ISA level per op",
            lambda: plots.isa_figure(frame, op_order))),
        latency_section(frame, op_order),
        figure_section("Thread scaling", "threads", figure_block(
            "thread-scaling", "Thread scaling per op",
            lambda: plots.thread_figure(frame, op_order))),
        working_set_section(frame, primary.env),
        precision_section(frame, op_order),
        comparison_section(loaded, op_order),
        distributed_section(primary.rows),
        *serving_sections(primary),
        wall_section(frame, op_order),
        problems_section(frame, primary.args),
    ]


def distributed_section(rows) -> Section:
    """Hybrid-parallel runs (run_bench.py dist): phases, collectives, measured vs PREDICTED."""
    blocks = [table_or_note("Step phases (slowest rank, medians)", dist.phase_table(rows),
                            "No run_bench.py dist rows in this run."),
              table_or_note("Collectives", dist.collective_table(rows),
                            "No collective microbenchmark rows.")]
    if any(row.op == "dist_predicted" or row.impl == "hybrid" for row in rows):
        blocks.append(figure_block("dist-scaling", "Measured and PREDICTED step time by ranks",
                                   lambda: dist.scaling_figure(rows)))
    return Section("Distributed (hybrid parallel)", "distributed", blocks)


def serving_sections(run: runs.Run) -> list[Section]:
    """LoadGen's latency percentiles vs offered QPS, for a run of `run_bench.py serve`."""
    if not serving.serving_points(run.rows):
        return []
    return [figure_section("Serving under a latency bound", "serving", figure_block(
        "serving-latency", "LoadGen latency percentiles vs offered QPS per serving setting, "
        "the SLA marked", lambda: serving.latency_figure(run.rows)))]


def figure_blocks(sections: list[Section]) -> list[FigureBlock]:
    """Every figure of the report, file names made unique."""
    figures, seen = [], set()
    for section in sections:
        for block in section.blocks:
            if isinstance(block, FigureBlock):
                stem, count = block.file_name[:-len(".png")], 2
                while block.file_name in seen:
                    block.file_name, count = f"{stem}-{count}.png", count + 1
                seen.add(block.file_name)
                figures.append(block)
    return figures


def render_markdown(title: str, subtitle: str, sections: list[Section]) -> str:
    """summary.md: every table as markdown, notes as quotes, figures as local links."""
    lines = [f"# {title}", "", subtitle, ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, TableBlock) and block.folded:
                lines += [f"<details><summary>{escape(block.title)}</summary>", "",
                          cells.markdown_table(block.table), "", "</details>", ""]
            elif isinstance(block, TableBlock):
                lines += [f"### {block.title}", "", cells.markdown_table(block.table), ""]
            elif isinstance(block, NoteBlock):
                lines += [f"> {block.text}", ""]
            elif isinstance(block, FigureBlock):
                lines += [f"![{block.caption}]({block.file_name})", ""]
    return "\n".join(lines)


def remove_stale_figures(report_dir: Path, keep: set[str]) -> None:
    """Delete figures of an earlier build that this build no longer draws."""
    for path in report_dir.glob(f"{FIGURE_PREFIX}*.png"):
        if path.name not in keep:
            path.unlink()


def write_report(report_dir: Path, title: str, subtitle: str, sections: list[Section]) -> None:
    """Write the figure PNGs, summary.md and index.html (last, so it never points at nothing)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    figures = figure_blocks(sections)
    for block in figures:
        write_atomic(report_dir / block.file_name, block.png)
    remove_stale_figures(report_dir, {block.file_name for block in figures})
    markdown = render_markdown(title, subtitle, sections)
    write_atomic(report_dir / "summary.md", markdown.encode("utf-8"))
    page = render_page(title, subtitle, sections)
    write_atomic(report_dir / "index.html", page.encode("utf-8"))


def build_report(run_dirs: list[Path], out_dir: Path | None = None) -> Path:
    """Build the report of run_dirs[0] (compared with the others); return the report dir."""
    directories = [Path(directory) for directory in run_dirs]
    if not directories:
        raise ValueError("build_report needs at least one run directory")
    report_dir = Path(out_dir) if out_dir is not None else directories[0] / "report"
    loaded = [runs.load_run(directory, label)
              for directory, label in zip(directories, unique_labels(directories))]
    built = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    subtitle = f"Run {loaded[0].label}"
    if len(loaded) > 1:
        subtitle += " compared with " + ", ".join(run.label for run in loaded[1:])
    subtitle += f"; built {built}."
    write_report(report_dir, REPORT_TITLE, subtitle, build_sections(loaded))
    return report_dir


def main(argv: list[str] | None = None) -> None:
    """Command line: python -m reports.build RUN_DIR [RUN_DIR ...] [--out DIR]."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path,
                        help="run directories; the first is analysed, the rest compared to it")
    parser.add_argument("--out", type=Path, default=None,
                        help="report directory (default: FIRST_RUN_DIR/report)")
    arguments = parser.parse_args(argv)
    print(build_report(arguments.run_dirs, arguments.out))


if __name__ == "__main__":
    main()
