"""The demo's figure: exact win-rate against SFT versus KL to SFT (left) and versus exact KL(π*‖π) (right).

One marker shape a row group (learned reward model, oracle reward, offline, start / target), one colour
a method, so a method's two online rows pair up by colour. Points that coincide share one label that
says so ("a & b (overlap)"); labels are placed so that none overlaps another label or a marker (`place_labels`).
"""
from __future__ import annotations

import math
from pathlib import Path

MARKERS = {"offline, preference pairs": "D", "online, learned reward model": "o"}
ORACLE_MARKER, REFERENCE_MARKER = "s", "*"
# candidate label offsets in points, tried in order: next to the marker, then further out on rings (with a
# leader line back to the marker)
OFFSETS = [(6, 3), (6, -11), (-6, 3), (-6, -11), (0, 9), (0, -17)] + [
    (round(r * math.cos(math.radians(a))), round(r * math.sin(math.radians(a))) - 4)
    for r in (22, 36, 52) for a in range(0, 360, 30)]
LEADER = 15         # offsets further than this (points) get a thin line to their marker


def _marker(group: str | None) -> str:
    if group is None:
        return REFERENCE_MARKER
    return MARKERS.get(group, ORACLE_MARKER)


def merge_coincident(points: list[tuple[float, float]], names: list[str], tol: float = 6.0) -> list[tuple[int, str]]:
    """Points (in display pixels) within `tol` of each other get one label naming them all ("a & b
    (overlap)"), so that no marker hides another unnoticed: [(index of the labelled point, label)]."""
    merged: list[tuple[int, list[str]]] = []
    for i, (point, name) in enumerate(zip(points, names)):
        for first, members in merged:
            if abs(point[0] - points[first][0]) <= tol and abs(point[1] - points[first][1]) <= tol:
                members.append(name)
                break
        else:
            merged.append((i, [name]))
    return [(i, members[0] if len(members) == 1 else " & ".join(members) + " (overlap)") for i, members in merged]


def _overlap(a, b) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0.0


def text_box(note, renderer):
    """The display box of an annotation's text alone (the annotation's own extent includes its leader line)."""
    from matplotlib.text import Text
    note.update_positions(renderer)         # places the text at its offset (done at draw time otherwise)
    return Text.get_window_extent(note, renderer)


def place_labels(ax, labelled: list[tuple[tuple[float, float], str]], fontsize: float = 7.0) -> list:
    """Annotate each point, trying `OFFSETS` in turn for a place that overlaps no earlier label, no marker
    and stays inside the axes; where none is free, the least overlapping one. Returns the annotations."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    markers = [ax.transData.transform(p) for p, _ in labelled]
    frame = ax.get_window_extent(renderer)
    placed, boxes = [], []
    for point, text in labelled:
        best = None
        for dx, dy in OFFSETS:
            leader = dict(arrowstyle="-", lw=0.5, color="grey") if math.hypot(dx, dy) > LEADER else None
            note = ax.annotate(text, point, textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                               ha="left" if dx > 0 else "right" if dx < 0 else "center", arrowprops=leader)
            box = text_box(note, renderer).expanded(1.05, 1.1)
            # another label overlapped counts twice its shared area, a marker under the text the text's
            # area, a text leaving the axes (cut off) ten times that: rather near a marker than cut off
            area = box.width * box.height
            cost = 2.0 * sum(_overlap(box, other) for other in boxes)
            cost += sum(area for m in markers if box.x0 - 3 < m[0] < box.x1 + 3 and box.y0 - 3 < m[1] < box.y1 + 3)
            inside = box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1
            cost += 0.0 if inside else 10.0 * area
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, note, box)
            else:
                note.remove()
            if cost == 0.0:
                break
        placed.append(best[1])
        boxes.append(best[2])
    return placed


def _panel(ax, results: dict, groups: dict, x_key: str, colours: dict) -> None:
    for name, row in results.items():
        group = groups.get(name)
        method = name.split(" (")[0]
        filled = group is None or MARKERS.get(group) is not None
        ax.plot(row[x_key], row["win_rate_exact"], _marker(group), ms=10 if group is None else 7,
                color=colours[method], mfc=colours[method] if filled else "white", mew=1.5, ls="none")
        if x_key == "kl_to_sft":
            ax.errorbar(row[x_key], row["win_rate_exact"], xerr=row["kl_to_sft_stderr"], fmt="none",
                        ecolor=colours[method], elinewidth=0.8, capsize=2)


def plot(results: dict, groups: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    rows = {k: v for k, v in results.items() if not k.startswith("_")}
    methods = list(dict.fromkeys(name.split(" (")[0] for name in rows))
    palette = plt.get_cmap("tab10").colors
    colours = {m: ("black" if m in ("sft", "pi*") else palette[i % len(palette)]) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5.2))
    panels = [("kl_to_sft", "KL(π ‖ π_sft) on the model's own samples (nats, ± s.e.)", rows),
              ("kl_target_to_policy", "exact KL(π* ‖ π) (nats, log scale; π* itself is at 0)",
               {k: v for k, v in rows.items() if v["kl_target_to_policy"] > 0})]
    for ax, (x_key, label, shown) in zip(axes, panels):
        _panel(ax, shown, groups, x_key, colours)
        if x_key == "kl_target_to_policy":
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks([t for t in (0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 50, 100)
                           if min(r[x_key] for r in shown.values()) / 1.2 <= t <= 1.2 * max(r[x_key] for r in shown.values())])
            ax.axvline(rows["sft"][x_key], color="grey", lw=0.8, ls="--")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel("exact win-rate against SFT (oracle P*)")
    fig.suptitle("distalign demo: every method from the same SFT start (dashed: SFT's values)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.canvas.draw()
    for ax, (x_key, _, shown) in zip(axes, panels):   # after the layout, so that label boxes are final
        points = [tuple(ax.transData.transform((row[x_key], row["win_rate_exact"]))) for row in shown.values()]
        names = list(shown)
        place_labels(ax, [((shown[names[i]][x_key], shown[names[i]]["win_rate_exact"]), text)
                          for i, text in merge_coincident(points, names)])
    handles = [Line2D([], [], marker=REFERENCE_MARKER, color="black", ls="none", ms=9, label="SFT start / π* target"),
               Line2D([], [], marker="D", color="grey", ls="none", label="offline, preference pairs"),
               Line2D([], [], marker="o", color="grey", ls="none", label="online, learned reward model"),
               Line2D([], [], marker=ORACLE_MARKER, color="grey", mfc="white", ls="none",
                      label="online, oracle reward γ log π* (same colour as its learned-RM row)")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)
