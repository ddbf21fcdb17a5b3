"""The pictures of mokd-visualize (matplotlib): one figure per image, and a contact sheet for a folder.

A panel is the image with an attention map over it (nearest-neighbour upsampling, so the token grid
stays visible), scaled to the panel's own maximum (written in its corner), and the local crops whose
queries the map belongs to drawn as boxes.
"""
from __future__ import annotations

import textwrap
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
    columns = min(max_columns, max(len(section.panels) for section in sections))
    rows = rows_of(sections, columns)
    figure, axes = new_figure(len(rows), columns, PANEL_INCHES, gap=0.3, header=0.35, legend=legend)
    for axes_row, (label, panels) in zip(axes, rows):
        for ax, panel in zip(axes_row, panels):
            draw_panel(ax, image, panel)
        for ax in axes_row[len(panels):]:
            ax.axis("off")
        if label:
            axes_row[0].set_ylabel(label, fontsize=7)
    return finish(figure, title, legend, out)


def draw_contact_sheet(rows: list[tuple[str, np.ndarray, list[Panel]]], title: str, legend: str, out: Path) -> Path:
    """A folder's overview: one row per image (its name as the row label), the same columns in each;
    the first row's panel titles head the columns."""
    columns = max(len(panels) for _, _, panels in rows)
    figure, axes = new_figure(len(rows), columns, PANEL_INCHES * 0.8, gap=0.08, header=0.7, legend=legend)
    for index, (axes_row, (name, image, panels)) in enumerate(zip(axes, rows)):
        for ax, panel in zip(axes_row, panels):
            draw_panel(ax, image, panel if index == 0 else panel._replace(title=""))
        for ax in axes_row[len(panels):]:
            ax.axis("off")
        axes_row[0].set_ylabel(name, fontsize=6)
    return finish(figure, title, legend, out)


LEFT_INCHES = 0.45  # room for the row labels
LEGEND_LINE_INCHES = 0.11
BAR_INCHES = 1.4


def legend_lines(legend: str, width_inches: float) -> list[str]:
    """The legend wrapped to the room right of the colour bar (6-pt text: about 22 characters an inch)."""
    room = max(30, int((width_inches - BAR_INCHES - LEFT_INCHES - 0.2) * 22))
    return [line for paragraph in legend.splitlines() for line in textwrap.wrap(paragraph, room)]


def new_figure(rows: int, columns: int, panel: float, gap: float, header: float, legend: str):
    """A grid of square panels of `panel` inches, `gap` inches between rows (their titles), `header`
    inches above them for the title, and room below for the wrapped legend."""
    plt = pyplot()
    width = LEFT_INCHES + columns * panel + 0.1
    bottom = 0.25 + LEGEND_LINE_INCHES * len(legend_lines(legend, width))
    height = header + rows * panel + (rows - 1) * gap + bottom
    figure, axes = plt.subplots(rows, columns, squeeze=False, dpi=DPI, figsize=(width, height))
    figure.subplots_adjust(left=LEFT_INCHES / width, right=1 - 0.1 / width, top=1 - header / height,
                           bottom=bottom / height, wspace=0.06, hspace=gap / panel)
    return figure, axes


def finish(figure, title: str, legend: str, out: Path) -> Path:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    width, height = figure.get_size_inches()
    figure.suptitle(title, fontsize=8, y=1 - 0.08 / height, va="top")
    bar = figure.add_axes([LEFT_INCHES / width, 0.3 / height, (BAR_INCHES - 0.3) / width, 0.08 / height])
    colours = figure.colorbar(ScalarMappable(Normalize(0, 1), COLOURMAP), cax=bar, orientation="horizontal")
    colours.set_ticks([0, 1], labels=["0", "panel max"], fontsize=6)
    figure.text((LEFT_INCHES + BAR_INCHES) / width, 0.12 / height, "\n".join(legend_lines(legend, width)),
                fontsize=6, va="bottom", ha="left")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    pyplot().close(figure)
    return out
