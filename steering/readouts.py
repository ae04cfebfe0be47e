"""Driver readouts in sweep results: does the model's own representation of a driver differ between monitored
and unmonitored, and does that difference track the compliance gap question by question?

A forced-choice sweep stores, per row, the projection of the residual stream on every driver's unit vector at
the answer position (``extra["readout"]``, labels ``driver@layer``), read in the scoring forward pass; a judged
sweep on a model with a forward pass stores the mean of that projection over the scratchpad's tokens, read while
generating. On the
unsteered rows this module pairs the two conditions of each question (and seed) and reports, per label:
mean readout monitored / unmonitored, the mean difference with a t-interval over questions, and the Pearson
correlation across questions between the readout difference and the compliance difference.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
from scipy import stats as _st
from torch import Tensor

from steering.baseline import BASELINE_DRIVER

OPEN_TAG, CLOSE_TAG = "<SCRATCHPAD_REASONING>", "</SCRATCHPAD_REASONING>"

READOUT_COLUMNS = (
    "label",
    "driver",
    "layer",
    "readout_monitored",
    "readout_unmonitored",
    "difference",
    "diff_ci_low",
    "diff_ci_high",
    "r",
    "r_p",
    "n",
)


def scratchpad_span(tokenizer, ids: list[int]) -> tuple[int, int] | None:
    """Half-open token span of the scratchpad's content in generated ``ids``: from the first token after the
    opening tag to the last token before the closing tag (or the end, if it never closes); None without a tag."""

    def first_token_reaching(char: int) -> int:
        """The smallest j with len(decode(ids[:j])) > char: ids[j - 1] holds character ``char``."""
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(tokenizer.decode(ids[:mid], skip_special_tokens=True)) > char:
                hi = mid
            else:
                lo = mid + 1
        return lo

    text = tokenizer.decode(ids, skip_special_tokens=True)
    opened = text.find(OPEN_TAG)
    if opened < 0:
        return None
    start = first_token_reaching(opened + len(OPEN_TAG) - 1)  # the token that completes the opening tag, + 1
    closed = text.find(CLOSE_TAG, opened + len(OPEN_TAG))
    end = first_token_reaching(closed) - 1 if closed >= 0 else len(ids)
    return (start, end) if end > start else None


def scratchpad_means(tokenizer, ids: list[list[int]], reads: dict[int, Tensor], labels: dict[int, list[str]]):
    """Per row: ``{label: mean readout over the scratchpad's tokens}`` (empty where there is no scratchpad)."""
    out = []
    for row, row_ids in enumerate(ids):
        span = scratchpad_span(tokenizer, row_ids)
        values: dict[str, float] = {}
        if span is not None:
            for layer, names in labels.items():
                window = reads[layer][row, span[0] : span[1]]
                window = window[~window.isnan().any(-1)]
                if len(window):
                    values.update({name: round(float(v), 5) for name, v in zip(names, window.mean(0))})
        out.append(values)
    return out


def readout_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Long form of the unsteered rows' readouts: question, seed, condition, label, readout, compliance."""
    base = df[df["driver"] == BASELINE_DRIVER] if "driver" in df.columns else df
    records = []
    for row in base.itertuples(index=False):
        values = json.loads(row.extra or "{}").get("readout") if hasattr(row, "extra") else None
        for label, value in (values or {}).items():
            records.append(
                {
                    "question": row.question,
                    "seed": row.seed,
                    "condition": row.condition,
                    "label": label,
                    "readout": float(value),
                    "compliance": row.compliance,
                }
            )
    return pd.DataFrame(records, columns=["question", "seed", "condition", "label", "readout", "compliance"])


def paired_differences(long: pd.DataFrame) -> pd.DataFrame:
    """Per label x question x seed: monitored minus unmonitored readout and compliance (both conditions needed)."""
    wide = long.pivot_table(
        index=["label", "question", "seed"], columns="condition", values=["readout", "compliance"], aggfunc="mean"
    )
    out = pd.DataFrame(
        {
            "readout_monitored": wide[("readout", "monitored")],
            "readout_unmonitored": wide[("readout", "unmonitored")],
            "readout_diff": wide[("readout", "monitored")] - wide[("readout", "unmonitored")],
            "compliance_diff": wide[("compliance", "monitored")] - wide[("compliance", "unmonitored")],
        }
    )
    return out.dropna().reset_index()


def readout_table(df: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """The per-label summary (``READOUT_COLUMNS``); empty when the rows carry no readouts."""
    long = readout_frame(df)
    if long.empty:
        return pd.DataFrame(columns=READOUT_COLUMNS)
    pairs = paired_differences(long)
    records = []
    for label, sub in pairs.groupby("label", sort=False):
        driver, _, layer = str(label).rpartition("@")
        n = len(sub)
        diff = sub["readout_diff"].to_numpy(float)
        mean = float(diff.mean())
        half = float(_st.t.ppf(0.5 + level / 2, n - 1) * diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        r, p = _pearson(diff, sub["compliance_diff"].to_numpy(float))
        records.append(
            {
                "label": label,
                "driver": driver,
                "layer": int(layer) if layer.lstrip("-").isdigit() else layer,
                "readout_monitored": float(sub["readout_monitored"].mean()),
                "readout_unmonitored": float(sub["readout_unmonitored"].mean()),
                "difference": mean,
                "diff_ci_low": mean - half,
                "diff_ci_high": mean + half,
                "r": r,
                "r_p": p,
                "n": n,
            }
        )
    return pd.DataFrame(records, columns=READOUT_COLUMNS).sort_values(["layer", "driver"], kind="stable")


def _pearson(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Pearson r and its p-value; NaN where undefined (fewer than 3 points, or a constant side)."""
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    result = _st.pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)
