"""Runs of several devices as one analysis: a CPU run and a GPU run side by side in a report."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from reports.device_roofs import is_gpu
from reports.runs import Run


@dataclasses.dataclass
class Analysis:
    """The rows a report analyses, each device's env.json, and what the later runs added."""

    frame: pd.DataFrame
    device_envs: dict[str, dict[str, Any]]
    added: list[str]  # "cuda:0 from run gpu" per later run that brought a device


def analysed_rows(loaded: list[Run]) -> Analysis:
    """The first run's rows, plus each later run's rows on devices no earlier run brought
    (rows of a device already analysed stay the comparison's); row ids renumbered."""
    first = loaded[0]
    envs = {device: first.env for device in first.frame["device"]}
    parts, added = [first.frame], []
    for run in loaded[1:]:
        new = sorted(set(run.frame["device"]) - set(envs))
        if not new:
            continue
        parts.append(run.frame[run.frame["device"].isin(new)])
        envs.update({device: run.env for device in new})
        added.append(f"{', '.join(new)} from run {run.label}")
    if len(parts) == 1:
        return Analysis(first.frame, envs, added)
    frame = pd.concat(parts, ignore_index=True)
    frame["row_id"] = np.arange(len(frame))
    return Analysis(frame, envs, added)


def device_line(frame: pd.DataFrame, added: list[str]) -> str:
    """One sentence naming each device (cpu model, GPU name) when a GPU or several devices
    ran, and the devices later runs brought; '' for a run of one CPU."""
    devices = sorted({str(device) for device in frame["device"] if device})
    if not added and not (len(devices) > 1 or any(is_gpu(device) for device in devices)):
        return ""
    named = []
    for device in devices:
        names = sorted({str(name) for name in frame.loc[frame["device"] == device,
                                                          "device_name"] if name})
        named.append(f"{device} ({', '.join(names)})" if names else device)
    line = f"Devices: {', '.join(named)}; each device's rows are set against its own roofs."
    if added:
        line += (f" Rows of {'; '.join(added)} join this analysis (devices the first run "
                 "lacks); the comparison below still matches rows by task key.")
    return line
