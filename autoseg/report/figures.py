"""The report's figures, drawn on matplotlib's Agg canvas (no display needed) into PNG bytes.

A case figure shows the chosen slices (``slices.py``) of one image channel in its
intensity window, the reference as solid and the prediction as dashed outlines in one
colour per class, and the voxels where they disagree tinted yellow.
"""

from __future__ import annotations

import gc
import io
import math

import numpy as np

from autoseg.io.images import Geometry
from autoseg.report.slices import Panel, disagreement_mask, display_transform, to_display

DPI = 80
MAX_PANEL_HEIGHT, MIN_PANEL_HEIGHT = 4.5, 2.5  # inches
MAX_PANELS_WIDTH = 18.0  # inches: panels shrink to this width until they reach the minimum height
GAP = 0.15  # inches between panels
TITLE_CLASSES = 6  # classes named in a figure's title; a report of 40 organs names the worst 6
DISAGREEMENT_COLOUR = "#ffd400"


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, outside pyplot.

    No pyplot means no backend to choose, no display, no global list of open figures, and
    nothing changed for a user who calls this from a notebook with an interactive backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def preload() -> None:
    """Import matplotlib now, so that forked worker processes inherit it instead of importing it each."""
    _figure(1, 1)
    import matplotlib.colors  # noqa: F401
    import matplotlib.lines  # noqa: F401
    import matplotlib.patches  # noqa: F401


def class_colours(names: list[str]) -> dict[str, tuple]:
    """One colour per class, stable across every figure of a report."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    skip = {8}  # tab10's olive is too close to the disagreement tint
    usable = [c for i, c in enumerate(palette) if i not in skip]
    return {name: usable[i % len(usable)] for i, name in enumerate(names)}


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    # A figure is a web of reference cycles holding its image arrays; Python's collector counts
    # objects, not bytes, and would let hundreds of figures pile up in a worker before it runs.
    gc.collect()
    return buffer.getvalue()


def case_title(case_id: str, fold: str | None, dice: dict[str, float], hd95: dict[str, float | None],
               reason: str) -> list[str]:
    """Title lines: the case, its mean Dice, Dice and HD95 per class (the worst few when there are many)."""
    def part(name: str) -> str:
        return f"{name}: Dice {dice[name]:.3f}, HD95 " + ("undefined" if hd95[name] is None else f"{hd95[name]:.2f} mm")

    names = list(dice)
    lines = [f"{case_id}   mean Dice {sum(dice.values()) / len(dice):.3f}" + (f"   (fold {fold})" if fold else "")]
    if len(names) > TITLE_CLASSES:
        names = sorted(names, key=lambda n: (dice[n], -(hd95[n] if hd95[n] is not None else np.inf)))[:TITLE_CLASSES]
        lines[0] += f"   the {TITLE_CLASSES} worst of {len(dice)} classes:"
    parts = [part(name) for name in names]
    lines += ["   ".join(parts[i:i + 3]) for i in range(0, len(parts), 3)]
    return lines + [f"cut through the {reason}"]


def draw_case(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, geometry: Geometry,
              classes: dict[str, list[int]], ignore: int | None, panels: list[Panel], window: tuple[float, float],
              title: list[str]) -> bytes:
    """PNG of one case; ``image`` (``(Z, Y, X)`` or ``(Z, Y, X, 3)``), ``reference`` and ``prediction`` as in the files."""
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    perm, flips = display_transform(geometry)
    disagreement = disagreement_mask(reference, prediction, classes, ignore)
    volumes = [to_display(a, perm, flips) for a in (image, reference, prediction, disagreement)]
    cuts = [[v[p.rows] for v in volumes] for p in panels]
    masks = [{name: (np.isin(ref, values), np.isin(pred, values)) for name, values in classes.items()}
             for _, ref, pred, _ in cuts]
    shown = [name for name in classes if any(m[name][0].any() or m[name][1].any() for m in masks)]
    colours = class_colours(list(classes))
    handles = [Line2D([], [], color=colours[name], label=name) for name in shown]
    handles += [Line2D([], [], color="k", label="reference"), Line2D([], [], color="k", ls="--", label="prediction"),
                Patch(color=DISAGREEMENT_COLOUR, alpha=0.6, label="disagreement")]
    # Panels share one height and keep their physical proportions (anisotropic spacing
    # included); the height shrinks, down to a floor, so that wide panels fit.
    ratios = [cut[0].shape[1] / (cut[0].shape[0] * panel.aspect) for cut, panel in zip(cuts, panels)]
    height = float(np.clip(MAX_PANELS_WIDTH / sum(ratios), MIN_PANEL_HEIGHT, MAX_PANEL_HEIGHT))
    widths = [r * height for r in ratios]
    columns = max(3, int(sum(widths) / 1.3))
    top = 0.17 * len(title) + 0.45
    bottom = 0.2 * math.ceil(len(handles) / columns) + 0.2
    fig_width = max(sum(widths) + GAP * (len(widths) + 1), 5.0)
    fig_height = height + top + bottom
    figure = _figure(fig_width, fig_height)
    left = (fig_width - sum(widths) - GAP * (len(widths) - 1)) / 2
    tint = ListedColormap([DISAGREEMENT_COLOUR])
    for panel, (pixels, _, _, wrong), panel_masks, width in zip(panels, cuts, masks, widths):
        ax = figure.add_axes((left / fig_width, bottom / fig_height, width / fig_width, height / fig_height))
        left += width + GAP
        if pixels.ndim == 3:  # colour: imshow takes RGB as floats in [0, 1]
            pixels = np.clip((pixels - window[0]) / (window[1] - window[0]), 0.0, 1.0)
        ax.imshow(pixels, cmap="gray", vmin=window[0], vmax=window[1], aspect="auto", interpolation="nearest")
        if wrong.any():
            ax.imshow(np.ma.masked_where(~wrong, wrong), cmap=tint, alpha=0.35, aspect="auto",
                      interpolation="nearest")
        for name, (ref_mask, pred_mask) in panel_masks.items():
            _outline(ax, ref_mask, colours[name], "solid")
            _outline(ax, pred_mask, colours[name], "dashed")
        ax.set_title(panel.label, fontsize=9)
        ax.set_axis_off()
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), columns), fontsize=8, frameon=False)
    figure.suptitle("\n".join(title), fontsize=9, y=1 - 0.08 / fig_height, va="top")
    return _png(figure)


def _outline(ax, mask: np.ndarray, colour, style: str) -> None:
    """The mask's boundary along voxel edges.

    Contouring the mask itself would cut every corner diagonally (marching squares), which
    on 3 mm slices draws hexagons where the voxels are rectangles; contouring a copy
    upsampled by nearest neighbour keeps the outline on the voxel edges. Only the mask's
    bounding box is upsampled, so the cost follows the structure, not the image.
    """
    if not mask.any() or mask.all():
        return
    box = []
    for axis in (1, 0):
        present = np.flatnonzero(mask.any(axis=axis))
        box.append((max(present[0] - 1, 0), min(present[-1] + 2, mask.shape[1 - axis])))
    (r0, r1), (c0, c1) = box
    factor = max(1, min(4, 256 // max(r1 - r0, c1 - c0)))
    fine = np.kron(mask[r0:r1, c0:c1], np.ones((factor, factor), np.float32))
    rows, cols = (start + (np.arange((stop - start) * factor) + 0.5) / factor - 0.5 for start, stop in box)
    ax.contour(cols, rows, fine, levels=[0.5], colors=[colour], linewidths=1.4, linestyles=style)


def draw_metric_boxplots(dice: dict[str, list[float]], hd95: dict[str, list[float | None]]) -> bytes:
    """Box plots of Dice and HD95 per class over cases, every case drawn as a point."""
    names = list(dice)
    colours = class_colours(names)
    figure = _figure(max(6.0, 1.6 * len(names) + 3.0), 3.6)
    axes = figure.subplots(1, 2)
    rng = np.random.default_rng(0)  # the same jitter every time: reports of the same data are the same
    for ax, values, title in ((axes[0], dice, "Dice"), (axes[1], hd95, "HD95 (mm)")):
        defined = [np.array([v for v in values[n] if v is not None], dtype=float) for n in names]
        ax.boxplot([d if d.size else [np.nan] for d in defined], showfliers=False)
        for i, (name, d) in enumerate(zip(names, defined), start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, d.size), d, s=10, color=colours[name], alpha=0.8, zorder=3)
        labels = [name if len(d) == len(values[name]) else f"{name}\n({len(values[name]) - len(d)} undefined)"
                  for name, d in zip(names, defined)]
        ax.set_xticks(range(1, len(names) + 1), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        if title == "Dice":
            ax.set_ylim(-0.02, 1.02)
    figure.tight_layout()
    return _png(figure)
