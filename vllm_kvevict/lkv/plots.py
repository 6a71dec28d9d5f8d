"""The training curve and the learned head budgets, as PNG files (matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(curve: list[dict], losses: list[float], path: Path, smooth: int = 20) -> None:
    """Left: training loss per step (and its running mean over ``smooth`` steps). Right: the
    validation KL under the served selection, LKV against keydiff + adakv (dashed, step 0)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = list(range(1, len(losses) + 1))
    left.plot(steps, losses, color="lightgray", linewidth=0.8, label="loss (one step)")
    means = [sum(losses[max(0, i - smooth + 1): i + 1]) / len(losses[max(0, i - smooth + 1): i + 1])
             for i in range(len(losses))]
    left.plot(steps, means, color="black", label=f"running mean ({smooth} steps)")
    left.set_xlabel("step")
    left.set_ylabel("KL(teacher || student), soft masks")
    left.set_yscale("log")
    left.legend()
    left.grid(alpha=0.3)
    keys = sorted(k for k in curve[0] if k.startswith("lkv/") and k.endswith("/kl/all"))
    for i, key in enumerate(keys):
        color = plt.cm.tab10(i)
        right.plot([c["step"] for c in curve if key in c], [c[key] for c in curve if key in c], marker="o",
                   color=color, label=key.replace("/kl/all", ""))
        base = key.replace("lkv/", "keydiff/")
        if base in curve[0]:
            right.axhline(curve[0][base], color=color, linestyle="--", linewidth=1, label=base.replace("/kl/all", ""))
    right.set_xlabel("step")
    right.set_ylabel("validation KL, served (hard) selection")
    right.set_yscale("log")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def plot_shares(shares, path: Path, budgets) -> None:
    """Per budget, each (layer, KV head)'s budget relative to the layer mean (``Hkv * share``)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(budgets), 1, figsize=(12, 2.2 * len(budgets) + 0.8), squeeze=False)
    for ax, budget in zip(axes[:, 0], budgets):
        rel = (shares(float(budget)) * shares.shape.num_kv_heads).T.numpy()  # [Hkv, Nl]
        image = ax.imshow(rel, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(2.0, float(rel.max())))
        ax.set_yticks(range(rel.shape[0]), [f"KV head {g}" for g in range(rel.shape[0])])
        ax.set_xticks(range(rel.shape[1]))
        ax.set_xlabel("layer")
        ax.set_title(f"LKV-H: head budget / layer mean at budget {budget:g}")
        for (g, l), value in np.ndenumerate(rel):
            ax.text(l, g, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white" if value < 1.2 else "black")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
