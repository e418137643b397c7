"""What StepFlow did: the statistics record that travels with generations and runs.

Examples
--------
>>> from stepsal_lens.results.stats import StepFlowStats
>>> stats = StepFlowStats(oeb_layers=[0, 1], smi_layers=[3])
>>> sorted(stats.to_dict())
['oeb', 'smi']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["StepFlowStats"]


@dataclass
class StepFlowStats:
    """What StepFlow did: OEB triggers and bridge mass per layer, SMI injections.

    Counts are over (row, head, query) attention rows for OEB and over (row, position)
    for SMI; "eligible" rows have a query in the thinking or summary segment with both
    groups non-empty. :meth:`per_row` gives the counts of each batch row of the last
    sequence batch.
    """

    oeb_layers: list[int]
    smi_layers: list[int]
    batch: int = 0
    oeb_triggers: dict[int, Tensor] = field(default_factory=dict)
    oeb_eligible: dict[int, Tensor] = field(default_factory=dict)
    bridge_before: dict[int, Tensor] = field(default_factory=dict)
    bridge_after: dict[int, Tensor] = field(default_factory=dict)
    smi_injections: dict[int, Tensor] = field(default_factory=dict)
    #: summaries of earlier batches inside the same ``stepflow`` block
    archive: list[dict[str, Any]] = field(default_factory=list, repr=False)
    #: OEB records not yet counted: (layer, triggered, row sum, bridge mass, tau_B,
    #: eligible groups), each ``[batch, head or 1, query]``; summed when read
    _pending: list[tuple[int, Tensor, Tensor, Tensor, Tensor, Tensor]] = field(
        default_factory=list, repr=False)

    def add_oeb(self, layer: int, act: Tensor, row: Tensor, m_b: Tensor, tau_b: Tensor,
                nonempty: Tensor) -> None:
        """Record what OEB did in one layer of one pass (counted lazily, so that a
        generation step costs one list append per layer)."""
        detached = [x.detach() if x.requires_grad else x for x in (row, m_b, tau_b)]
        self._pending.append((layer, act, *detached, nonempty))

    def _flush(self) -> None:
        """Add the pending OEB records into the per-row counters (one reduction per layer
        over all of its records)."""
        pending, self._pending = self._pending, []
        by_layer: dict[int, list] = {}
        for rec in pending:
            by_layer.setdefault(rec[0], []).append(rec[1:])
        for layer, recs in by_layer.items():
            act, row, m_b, tau_b, nonempty = (
                torch.cat([r[i].expand_as(r[0]).flatten(1) for r in recs], dim=1)
                for i in range(5))
            eligible = nonempty & (row > 0)
            p_b = m_b / row.clamp_min(torch.finfo(row.dtype).tiny)
            after = torch.where(act, tau_b, p_b)
            sums = torch.stack([act.to(p_b.dtype), eligible.to(p_b.dtype), p_b * eligible,
                                after * eligible]).double().sum(2).cpu()  # [4, batch]
            self.oeb_triggers[layer] += sums[0]
            self.oeb_eligible[layer] += sums[1]
            self.bridge_before[layer] += sums[2]
            self.bridge_after[layer] += sums[3]

    def start_batch(self, batch: int) -> None:
        """Zero the per-row counters for a new batch of sequences."""
        self._flush()
        self.batch = batch
        z = lambda: torch.zeros(batch, dtype=torch.float64)  # noqa: E731
        for store, layers in ((self.oeb_triggers, self.oeb_layers),
                              (self.oeb_eligible, self.oeb_layers),
                              (self.bridge_before, self.oeb_layers),
                              (self.bridge_after, self.oeb_layers),
                              (self.smi_injections, self.smi_layers)):
            for layer in layers:
                store[layer] = z()

    def _summary(self, rows: slice | int) -> dict[str, Any]:
        self._flush()
        pick = lambda d: {l: float(v[rows].sum()) for l, v in d.items()}  # noqa: E731
        trig, elig = pick(self.oeb_triggers), pick(self.oeb_eligible)
        before, after = pick(self.bridge_before), pick(self.bridge_after)
        inj = pick(self.smi_injections)
        n_elig = sum(elig.values())
        return {
            "oeb": {
                "triggers": int(sum(trig.values())),
                "triggers_per_layer": {str(l): int(v) for l, v in trig.items()},
                "eligible_rows": int(n_elig),
                "eligible_rows_per_layer": {str(l): int(v) for l, v in elig.items()},
                "mean_bridge_mass_before": (sum(before.values()) / n_elig) if n_elig else None,
                "mean_bridge_mass_after": (sum(after.values()) / n_elig) if n_elig else None,
            },
            "smi": {
                "injections": int(sum(inj.values())),
                "injections_per_layer": {str(l): int(v) for l, v in inj.items()},
            },
        }

    def to_dict(self) -> dict[str, Any]:
        """Totals over every sequence seen inside the ``stepflow`` block."""
        out = self._summary(slice(None))
        for old in self.archive:
            out = _add_summaries(out, old)
        return out

    def per_row(self) -> list[dict[str, Any]]:
        """One summary per row of the last batch of sequences."""
        return [self._summary(b) for b in range(self.batch)]

    def archive_batch(self) -> None:
        """Keep the current batch's totals (a new batch of sequences starts)."""
        if self.batch:
            self.archive.append(self._summary(slice(None)))


def _add_summaries(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Sum two :meth:`StepFlowStats._summary` results (means weighted by eligible rows)."""
    oa, ob = a["oeb"], b["oeb"]
    n = oa["eligible_rows"] + ob["eligible_rows"]

    def mean(key):
        total = sum((o[key] or 0) * o["eligible_rows"] for o in (oa, ob))
        return total / n if n else None

    add = lambda x, y: {k: x.get(k, 0) + y.get(k, 0) for k in {**x, **y}}  # noqa: E731
    return {
        "oeb": {"triggers": oa["triggers"] + ob["triggers"],
                "triggers_per_layer": add(oa["triggers_per_layer"], ob["triggers_per_layer"]),
                "eligible_rows": n,
                "eligible_rows_per_layer": add(oa["eligible_rows_per_layer"],
                                               ob["eligible_rows_per_layer"]),
                "mean_bridge_mass_before": mean("mean_bridge_mass_before"),
                "mean_bridge_mass_after": mean("mean_bridge_mass_after")},
        "smi": {"injections": a["smi"]["injections"] + b["smi"]["injections"],
                "injections_per_layer": add(a["smi"]["injections_per_layer"],
                                            b["smi"]["injections_per_layer"])},
    }
