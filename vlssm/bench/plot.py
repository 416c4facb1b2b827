"""PNG figures of benchmark CSVs (optional: needs matplotlib, imported only when a figure is drawn).

- :func:`load_csv`: a benchmark CSV's rows, numbers parsed.
- :func:`line_figure`: generic: one line per series (e.g. provider) of y against x, one panel per
  y column, log axes optional; any workload's sweep can use it (e.g. the IFM's time vs M).
- :func:`plot_attention`: the figures of ``vlssm bench attention``: latency vs tokens, peak memory
  vs tokens, speed-up vs the self-attention block, and FLOPs vs input resolution with a parameter
  panel in the style of MVLR's Figure 5.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend
change) and written as ``<out_dir>/<stem>-<name>.png``; every function returns the paths it wrote.
"""
from __future__ import annotations

import csv
import importlib
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["MissingMatplotlib", "require_matplotlib", "load_csv", "line_figure", "plot_attention", "STYLES"]

Row = Dict[str, Any]

#: provider -> matplotlib line style keywords (others get the default colour cycle).
STYLES: Dict[str, Dict[str, Any]] = {
    "qmvl-fused": dict(color="tab:red", marker="o", linestyle="-"),
    "qmvl-literal": dict(color="tab:orange", marker="s", linestyle="-"),
    "self-attn-block": dict(color="tab:blue", marker="^", linestyle="-"),
    "cross-attn-block": dict(color="tab:green", marker="v", linestyle="-"),
    "self-attn": dict(color="tab:blue", marker="^", linestyle=":", alpha=0.6),
    "cross-attn": dict(color="tab:green", marker="v", linestyle=":", alpha=0.6),
}


class MissingMatplotlib(ImportError):
    """matplotlib, which the figures need, is not installed."""


def require_matplotlib() -> None:
    """Raise :class:`MissingMatplotlib` (naming the package and how to install it) when it is absent."""
    try:
        importlib.import_module("matplotlib")
    except ImportError as e:
        raise MissingMatplotlib("the figures need matplotlib, which is not installed (import failed: "
                                f"{e}); install it with: pip install matplotlib") from None


def _figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _parse(v: str) -> Any:
    if v == "":
        return ""
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(v, v)


def load_csv(path: str) -> List[Row]:
    """The rows of a benchmark CSV, ints and floats parsed (empty cells stay "")."""
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _num(v: Any) -> Optional[float]:
    """``v`` as a finite float, or None (empty, text, NaN)."""
    if isinstance(v, bool) or v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _series(rows: Iterable[Row], key: str) -> List[str]:
    return list(dict.fromkeys(str(r[key]) for r in rows if key in r))


def line_figure(rows: Sequence[Row], path: str, *, x: str, panels: Sequence[Tuple[str, str]], series: str = "provider",
                title: str = "", xlabel: Optional[str] = None, logx: bool = True, logy: bool = True,
                hline: Optional[float] = None, xticklabels: Optional[Dict[float, str]] = None,
                exclude: Sequence[str] = (), styles: Optional[Dict[str, Dict[str, Any]]] = None) -> Optional[str]:
    """One panel per ``(y column, y label)`` of ``panels``: a line of y against ``x`` per value of
    ``series``, over the rows with numbers in both (failed rows drop out). ``hline``: a dashed
    reference line; ``xticklabels``: {x value: label}. Writes ``path``; returns it, or None when no
    panel had any point (nothing is written).
    """
    styles = STYLES if styles is None else styles
    names = [s for s in _series(rows, series) if s not in exclude]
    data = {}
    for y, _ in panels:
        for s in names:
            pts = sorted((_num(r.get(x)), _num(r.get(y))) for r in rows if str(r.get(series)) == s
                         and _num(r.get(x)) is not None and _num(r.get(y)) is not None)
            if pts:
                data[y, s] = pts
    if not data:
        return None
    fig = _figure(5.8 * len(panels), 4.4)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (y, ylabel) in zip(axes, panels):
        for s in names:
            if (y, s) in data:
                xs, ys = zip(*data[y, s])
                ax.plot(xs, ys, label=s, **styles.get(s, {"marker": "o"}))
        if logx:
            ax.set_xscale("log")
        if logy and any(v > 0 for (yy, _), pts in data.items() if yy == y for _, v in pts):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        if hline is not None:
            ax.axhline(hline, color="0.4", linestyle="--", linewidth=1)
        if xticklabels:
            ax.set_xticks(list(xticklabels))
            ax.set_xticklabels(list(xticklabels.values()), fontsize=8)
            ax.minorticks_off()
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if any(yy == y for yy, _ in data):
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# ----------------------------------------------------------------------------- the attention workload

def _main_group(rows: Sequence[Row]) -> Tuple[Any, Any, List[Row]]:
    """The (C, d) with the most distinct M (the M sweep; ties go to MVLR's C=80, d=512, then the
    first seen) and its rows."""
    groups: Dict[Tuple[Any, Any], List[Row]] = {}
    for r in rows:
        groups.setdefault((r.get("c"), r.get("d")), []).append(r)

    def rank(item):
        (c, d), rs = item
        return len({r.get("m") for r in rs}), (c, d) == (80, 512)

    (c, d), rs = max(groups.items(), key=rank)
    return c, d, rs


def _title(what: str, rows: Sequence[Row], c: Any, d: Any) -> str:
    r = rows[0]
    dev = f"{r.get('device', '')}: {r.get('device_name', '')}".strip(": ")
    return f"{what}\n{dev} | {r.get('dtype', '')} | B={r.get('batch', '')} C={c} d={d}"


def _m_ticks(rows: Sequence[Row]) -> Dict[float, str]:
    ticks = {}
    for r in rows:
        m = _num(r.get("m"))
        if m is not None:
            px = _num(r.get("resolution_px"))
            ticks[m] = f"{m:.0f}\n{px:.0f}" if px else f"{m:.0f}"
    return dict(sorted(ticks.items()))


def _figure5(rows: Sequence[Row], path: str, title: str) -> Optional[str]:
    """MVLR Figure 5's style: parameters per provider (bars, left) and forward GMACs per image vs
    input resolution (px of the stride-32 token counts, right)."""
    names = _series(rows, "provider")
    res_rows = [r for r in rows if _num(r.get("resolution_px")) and _num(r.get("gmacs_fwd_per_image")) is not None]
    params = {s: next((_num(r.get("params")) for r in rows if str(r.get("provider")) == s
                       and _num(r.get("params")) is not None), None) for s in names}
    params = {s: p for s, p in params.items() if p is not None}
    if not res_rows and not params:
        return None
    fig = _figure(12, 4.4)
    ax_p, ax_f = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2]})
    if params:
        xs = list(range(len(params)))
        bars = ax_p.bar(xs, [p / 1e6 for p in params.values()],
                        color=[STYLES.get(s, {}).get("color", "tab:gray") for s in params],
                        alpha=0.85)
        for b, p in zip(bars, params.values()):
            ax_p.annotate(f"{p / 1e6:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                          va="bottom", fontsize=8)
        ax_p.set_xticks(xs)
        ax_p.set_xticklabels(list(params), rotation=30, ha="right", fontsize=8)
        ax_p.set_ylabel("parameters (M)")
        ax_p.set_title("parameters", fontsize=9)
        ax_p.grid(True, axis="y", alpha=0.3)
    for s in names:
        pts = sorted((_num(r["resolution_px"]), _num(r["gmacs_fwd_per_image"])) for r in res_rows
                     if str(r.get("provider")) == s)
        if pts:
            xs, ys = zip(*pts)
            ax_f.plot(xs, ys, label=s, **STYLES.get(s, {"marker": "o"}))
    pxs = sorted({_num(r["resolution_px"]) for r in res_rows})
    if pxs:
        ax_f.set_xticks(pxs)
        ax_f.set_xticklabels([f"{p:.0f}" for p in pxs], fontsize=8)
        ax_f.legend(fontsize=8)
    ax_f.set_xlabel("input resolution (px; tokens M = (px / 32)^2)")
    ax_f.set_ylabel("forward GMACs per image")
    ax_f.set_title("FLOPs (multiply-adds) vs input resolution", fontsize=9)
    ax_f.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_attention(rows: Sequence[Row], out_dir: str, stem: str) -> List[str]:
    """The figures of an attention sweep (rows as written to / read from its CSV), over its M sweep
    (the (C, d) with the most M values). Writes into ``out_dir``:

    - ``<stem>-latency.png``: forward and forward+backward ms vs tokens M per provider (log-log);
    - ``<stem>-memory.png``: peak memory increase (fwd, fwd+bwd) vs M, linear y (only when measured);
    - ``<stem>-speedup.png``: self-attn-block time / provider time vs M (> 1: faster than it);
    - ``<stem>-flops.png``: parameters (bars) and forward GMACs per image vs input resolution.

    Returns the paths written. Raises :class:`MissingMatplotlib` without matplotlib.
    """
    require_matplotlib()
    if not rows:
        return []
    c, d, rs = _main_group(rows)
    ticks = _m_ticks(rs)
    xl = "tokens M (second line: input px, M = (px / 32)^2)"
    out: List[Optional[str]] = []
    p = os.path.join(out_dir, stem)
    out.append(line_figure(rs, f"{p}-latency.png", x="m", xlabel=xl, xticklabels=ticks,
                           panels=[("fwd_ms", "forward (ms)"), ("fwdbwd_ms", "forward+backward (ms)")],
                           title=_title("latency vs tokens", rs, c, d)))
    out.append(line_figure(rs, f"{p}-memory.png", x="m", xlabel=xl, xticklabels=ticks, logy=False,
                           panels=[("peak_mem_fwd_increase_mb", "forward: peak increase (MB)"),
                                   ("peak_mem_fwdbwd_increase_mb", "forward+backward: peak increase (MB)")],
                           title=_title("peak memory increase vs tokens", rs, c, d)))
    speed = [dict(r, fwd_speedup=1 / f if f else "", fwdbwd_speedup=1 / b if b else "")
             for r in rs for f, b in [(_num(r.get("fwd_ratio_vs_self_attn_block")),
                                       _num(r.get("fwdbwd_ratio_vs_self_attn_block")))]]
    out.append(line_figure(speed, f"{p}-speedup.png", x="m", xlabel=xl, xticklabels=ticks, hline=1.0,
                           exclude=("self-attn-block",),
                           panels=[("fwd_speedup", "forward speed-up (x)"),
                                   ("fwdbwd_speedup", "forward+backward speed-up (x)")],
                           title=_title("speed-up vs self-attn-block: its time / provider time (> 1: faster)",
                                        rs, c, d)))
    out.append(_figure5(rs, f"{p}-flops.png", _title("parameters and FLOPs (MVLR Figure 5 style)", rs, c, d)))
    return [q for q in out if q]


# ----------------------------------------------------------------------------- the IFM sweep

def plot_ifm(rows: Sequence[Row], out_dir: str, stem: str) -> List[str]:
    """The IFM sweep's figure: forward and forward+backward time vs the label count C, one line per
    (provider, M), log axes; written to ``out_dir/<stem>-latency.png``. Returns the paths written."""
    require_matplotlib()
    lines = [dict(r, series=f"{r.get('provider')} M={r.get('m')}") for r in rows]
    first = rows[0] if rows else {}
    title = (f"IFM: fused vs the paper's formulas, time vs labels C\n{first.get('device', '')}: "
             f"{first.get('device_name', '')} | {first.get('dtype', '')} | B={first.get('batch', '')} "
             f"d={first.get('d', '')} heads={first.get('heads', '')}")
    styles = {s: {"marker": "o" if s.startswith("fused") else "s", "linestyle": "-" if s.startswith("fused") else ":"}
              for s in _series(lines, "series")}
    path = line_figure(lines, os.path.join(out_dir, f"{stem}-latency.png"), x="c", series="series",
                       panels=[("fwd_ms", "forward (ms)"), ("fwdbwd_ms", "forward+backward (ms)")],
                       title=title, xlabel="labels C", styles=styles,
                       xticklabels={c: f"{c:g}" for c in sorted({_num(r.get("c")) for r in rows} - {None})})
    return [path] if path else []
