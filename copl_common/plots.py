"""The figures saved as PNG: training curves, the user-embedding map, and the robustness bench's gap chart.

Drawn on matplotlib's object API (Figure + Agg canvas), not pyplot: no global figure state, so
training in threads or in a Ray worker cannot draw into another run's figure.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def save_training_curve(path: str | Path, title: str, xlabel: str, loss_name: str,
                        train_steps: Sequence[int], train_loss: Sequence[float],
                        check_steps: Sequence[int], check_loss: Sequence[float],
                        check_accuracy: Sequence[float]) -> Path:
    """Training loss per step and, at each early-stopping check, the selection pairs' loss (left axis)
    and pair accuracy (right axis)."""
    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(train_steps, train_loss, label=f"train {loss_name}")
    handles = ax.get_legend_handles_labels()
    if check_steps:
        ax.plot(check_steps, check_loss, "o-", label=f"selection {loss_name}")
        acc_ax = ax.twinx()
        acc_ax.plot(check_steps, check_accuracy, "s-", color="tab:green", label="selection pair accuracy")
        acc_ax.set_ylabel("pair accuracy")
        acc_ax.set_ylim(0.0, 1.0)
        handles = [a + b for a, b in zip(ax.get_legend_handles_labels(), acc_ax.get_legend_handles_labels())]
    ax.legend(*handles, loc="center right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(loss_name)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def save_embedding_map(users: torch.Tensor, groups: list[str | None], max_points: int, seed: int,
                       path: str | Path) -> Path:
    """First two principal components of (a deterministic sample of) the user embeddings, coloured by group."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(users.shape[0], generator=g)[:max_points].sort().values
    x = users[pick].double()
    x = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    xy = np.zeros((x.shape[0], 2))
    xy[:, :min(2, vh.shape[0])] = (x @ vh[:2].T).numpy()                   # (n, 2)
    labels = np.array(["(none)" if groups[i] is None else str(groups[i]) for i in pick.tolist()])
    names, codes = np.unique(labels, return_inverse=True)
    fig = Figure(figsize=(6.5, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    points = ax.scatter(xy[:, 0], xy[:, 1], c=codes, cmap="tab20" if len(names) > 10 else "tab10",
                        s=4, alpha=0.6, vmin=0, vmax=max(len(names) - 1, 1))
    if len(names) <= 20:
        handles, _ = points.legend_elements(num=list(range(len(names))))
        ax.legend(handles, names.tolist(), title="group", loc="best", fontsize="small")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"User embeddings ({x.shape[0]:,} of {users.shape[0]:,} users)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def save_gap_chart(path: str | Path, regimes: Sequence[str], seen: Sequence[float | None],
                   unseen: Sequence[float | None], goals: Sequence[float], title: str) -> Path:
    """Gap closed per regime, seen and unseen users side by side (horizontal bars, a missing figure drawn
    as no bar), with the goals as dashed vertical lines."""
    y = np.arange(len(regimes))
    fig = Figure(figsize=(10, 0.45 * len(regimes) + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for offset, values, label in ((-0.2, seen, "seen users"), (0.2, unseen, "unseen users (adapted)")):
        ax.barh(y + offset, [np.nan if v is None else v for v in values], height=0.4, label=label)
    for goal in goals:
        ax.axvline(goal, color="black", linestyle="--", linewidth=0.8)
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_yticks(y, list(regimes))
    ax.invert_yaxis()
    ax.set_xlabel("gap closed = (CoPL - baseline) / (oracle - baseline)")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")   # outside: never over a bar
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)
