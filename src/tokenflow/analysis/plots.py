"""The analysis commands' figures (matplotlib, drawn off-screen)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_slices", "plot_sweep", "save_reconstruction_figure"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_slices(path: Path, slices: list[tuple[str, np.ndarray, np.ndarray]], row: int, layer: str,
                timestep: int) -> None:
    """One row per video: image row ``row`` of every frame stacked over time (time downwards), in pixels and in
    the features' PCA colours. A consistent video draws straight or smoothly slanted lines in both."""
    fig = _figure(9, 1.2 + 1.9 * len(slices))
    axes = fig.subplots(len(slices), 2, squeeze=False)
    for (name, pixels, features), (left, right) in zip(slices, axes):
        for ax, image, what in ((left, pixels, "pixels"), (right, features, "features (PCA)")):
            ax.imshow(image, aspect="auto", interpolation="nearest")
            ax.set_title(f"{name}: {what}", fontsize=9)
            ax.set_xlabel("x")
            ax.set_ylabel("frame")
    fig.suptitle(f"row {row} over time; {layer}, t={timestep}", fontsize=10)
    fig.savefig(path)


def save_reconstruction_figure(path: Path, source: np.ndarray, target: np.ndarray, images: dict, i: int,
                               point: dict) -> None:
    """Frame I, the true frame J and J rebuilt (tokens, warp, and J denoised on its own), with their PSNRs."""
    j = point["to"]
    panels = [(source, f"frame {i} (I): {point['psnr_unwarped']:.1f} dB"), (target, f"frame {j} (J), true")]
    names = {"tokens": "tokens from I", "warp": "I warped", "plain": "J denoised alone"}
    for kind, label in names.items():
        if (kind, j) in images:
            panels.append((images[(kind, j)], f"{label}: {point[f'psnr_{kind}']:.1f} dB"))
    height, width = target.shape[:2]
    fig = _figure(1.0 + 2.6 * len(panels), 0.6 + 2.6 * height / width)
    for ax, (image, title) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.savefig(path)


def plot_sweep(path: Path, sweep: dict) -> None:
    """PSNR of the rebuilt frames against their distance from frame I."""
    fig = _figure(7, 4)
    ax = fig.subplots()
    points = sweep["points"]
    distance = [p["distance"] for p in points]
    styles = {"psnr_plain": ("J denoised alone (ceiling of tokens)", "tab:gray", ":"), "psnr_tokens": ("tokens from I", "tab:red", "-"),
              "psnr_warp": ("I warped", "tab:blue", "-"), "psnr_unwarped": ("I itself", "black", "--")}
    for key, (label, colour, line) in styles.items():
        values = [p[key] for p in points]
        if all(v is not None for v in values):
            ax.plot(distance, values, marker="o", label=label, color=colour, linestyle=line)
    ax.set_xlabel(f"frame distance |J - I| (I = {sweep['from']})")
    ax.set_ylabel("PSNR against frame J (dB)")
    ax.set_title("How far a keyframe's features can serve")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.savefig(path)
