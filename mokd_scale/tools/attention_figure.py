"""The pictures of mokd-visualize (matplotlib): one figure per image, and a contact sheet for a folder.

A panel is the image with an attention map over it (nearest-neighbour upsampling, so the token grid
stays visible), scaled to the panel's own maximum (written in its corner), and the local crops whose
queries the map belongs to drawn as boxes.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

COLOURMAP = "inferno"
HEAT_ALPHA = 0.6
PANEL_INCHES = 1.7
DPI = 90
BOX_COLOUR = "#37d6ff"


class Panel(NamedTuple):
    title: str
    heat: np.ndarray | None = None  # (h, w) weights; None: the image alone
    boxes: tuple = ()  # ((x0, y0, x1, y1) as fractions of the image, label), ...
    corner: str = ""  # extra text under the panel's maximum (e.g. the weight a query keeps on itself)


class Section(NamedTuple):
    label: str  # row label, e.g. "a (vit_small_patch16_224)\nclass token"
    panels: list[Panel]
    short: str = ""  # the contact sheet's column header before the first panel's title, e.g. "b -> a"


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: the tool runs headless
    import matplotlib.pyplot as plt
    return plt


def draw_panel(ax, image: np.ndarray, panel: Panel) -> None:
    ax.imshow(image, extent=(0, 1, 1, 0), interpolation="bilinear")
    lines = []
    if panel.heat is not None:
        peak = float(panel.heat.max())
        ax.imshow(panel.heat / peak if peak > 0 else panel.heat, cmap=COLOURMAP, alpha=HEAT_ALPHA, vmin=0, vmax=1,
                  extent=(0, 1, 1, 0), interpolation="nearest")
        lines.append(f"max {peak:.3f}")
    if panel.corner:
        lines.append(panel.corner)
    if lines:
        ax.text(0.03, 0.97, "\n".join(lines), transform=ax.transAxes, fontsize=6, color="white", va="top",
                ha="left", bbox={"facecolor": "black", "alpha": 0.55, "pad": 1.0, "linewidth": 0})
    for (x0, y0, x1, y1), label in panel.boxes:
        from matplotlib.patches import Rectangle
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=BOX_COLOUR, linewidth=1.2))
        ax.text(x0 + 0.02, y0 + 0.02, label, color=BOX_COLOUR, fontsize=6, va="top", ha="left")
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(panel.title, fontsize=7, pad=2)


def rows_of(sections: list[Section], columns: int) -> list[tuple[str, list[Panel]]]:
    """Sections wrapped into rows of at most `columns` panels; a wrapped row repeats no label."""
    rows = []
    for section in sections:
        for start in range(0, len(section.panels), columns):
            rows.append((section.label if start == 0 else "", section.panels[start:start + columns]))
    return rows


def draw_image(image: np.ndarray, sections: list[Section], title: str, legend: str, out: Path,
               max_columns: int = 8) -> Path:
    """One PNG: a row per section (wrapped after max_columns panels), the title on top, the legend and
    a colour bar below."""
    plt = pyplot()
    columns = min(max_columns, max(len(section.panels) for section in sections))
    rows = rows_of(sections, columns)
    figure, axes = plt.subplots(len(rows), columns, squeeze=False, dpi=DPI,
                                figsize=(columns * PANEL_INCHES, len(rows) * (PANEL_INCHES + 0.15) + 0.9))
    for axes_row, (label, panels) in zip(axes, rows):
        for ax, panel in zip(axes_row, panels):
            draw_panel(ax, image, panel)
        for ax in axes_row[len(panels):]:
            ax.axis("off")
        if label:
            axes_row[0].set_ylabel(label, fontsize=7)
    finish(figure, title, legend, out)
    return out


def draw_contact_sheet(rows: list[tuple[str, np.ndarray, list[Panel]]], title: str, legend: str, out: Path) -> Path:
    """A folder's overview: one row per image (its name as the row label), the same columns in each;
    the first row's panel titles head the columns."""
    plt = pyplot()
    columns = max(len(panels) for _, _, panels in rows)
    figure, axes = plt.subplots(len(rows), columns, squeeze=False, dpi=DPI,
                                figsize=(columns * PANEL_INCHES * 0.8, len(rows) * PANEL_INCHES * 0.8 + 0.9))
    for index, (axes_row, (name, image, panels)) in enumerate(zip(axes, rows)):
        for ax, panel in zip(axes_row, panels):
            draw_panel(ax, image, panel if index == 0 else panel._replace(title=""))
        for ax in axes_row[len(panels):]:
            ax.axis("off")
        axes_row[0].set_ylabel(name, fontsize=6)
    finish(figure, title, legend, out)
    return out


def finish(figure, title: str, legend: str, out: Path) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    height = figure.get_figheight()
    figure.suptitle(title, fontsize=8)
    figure.subplots_adjust(left=0.06, right=0.98, top=1 - 0.45 / height, bottom=0.8 / height, wspace=0.08,
                           hspace=0.3)
    bar = figure.add_axes([0.06, 0.18 / height, 0.16, 0.1 / height])
    colours = figure.colorbar(ScalarMappable(Normalize(0, 1), COLOURMAP), cax=bar, orientation="horizontal")
    colours.set_ticks([0, 1], labels=["0", "panel max"], fontsize=6)
    figure.text(0.25, 0.08 / height, legend, fontsize=6, va="bottom", ha="left", wrap=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    import matplotlib.pyplot as plt
    plt.close(figure)
