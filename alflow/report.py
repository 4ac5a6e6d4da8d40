"""Report of an active-learning run: Markdown + self-contained HTML with plots.

``write_report(run_dir)`` reads ``state.json``, ``config.yaml`` and the stage
outputs of a run directory (alflow.loop) at any point of the run, and writes

- ``report/*.png``: learning curve (validation force RMSE and the error on the
  newly selected frames vs frames trained on), uncertainty vs true error on the
  labelled frames (the committee of iteration i predicted the frames it
  selected; the labels give the true max force error; log-log), histograms of
  the max force deviation of every explored frame per iteration, and the
  walkers' stop statuses per iteration;
- ``report.md`` (figures linked) and ``report.html`` (figures embedded as
  base64 PNG: one file to send around).

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend change).
Units: eV/Å for forces and deviations, meV/atom for energy errors, s for times.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from alflow.keys import MAX_FORCE_DEVIATION
from alflow.loop import atomic_write_text, read_state
from alflow.results import Explored, Initial

FIGURES = {
    "learning_curve": "Learning curve",
    "uncertainty_vs_error": "Uncertainty vs true error on the labelled frames",
    "calibration": "Calibration: predicted vs true force error of the labelled frames, before and after",
    "uncertainty_histograms": "Max force deviation of the explored frames",
    "walker_status": "Walker stop statuses",
}
STATUS_COLOURS = {"DONE": "#4c9f70", "UNCERTAIN": "#e0a030", "EXPLODED": "#c8553d", "ERROR": "#6c6c6c",
                  "TIMEOUT": "#8e6cbf"}


def _iterations(state: dict[str, Any], name: str) -> list[tuple[int, dict[str, Any]]]:
    """(iteration, result) of every finished ``name`` stage, in order."""
    out = [(rec["iteration"], rec["result"]) for rec in state.get("stages", {}).values() if rec["stage"] == name]
    return sorted(out, key=lambda x: x[0])


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def _figure(width: float = 6.0, height: float = 4.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.9, max(n, 1))]


def plot_learning_curve(rows: list[dict[str, Any]]) -> bytes | None:
    """Validation force RMSE and force RMSE on the newly selected frames vs frames trained on."""
    pts = [(r["dataset_size"], r["valid_forces_rmse"], r.get("new_forces_rmse"), r["iteration"]) for r in rows
           if r.get("valid_forces_rmse") is not None]
    if not pts:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    x = [p[0] for p in pts]
    ax.plot(x, [p[1] for p in pts], "o-", label="validation split")
    new = [(p[0], p[2]) for p in pts if p[2] is not None]
    if new:
        ax.plot([p[0] for p in new], [p[1] for p in new], "s--", label="frames it selected (after labelling)")
    for xi, yi, _, it in pts:
        ax.annotate(str(it), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("labelled frames trained on")
    ax.set_ylabel("force RMSE of the committee mean (eV/Å)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def plot_uncertainty_vs_error(errors: dict[int, list[dict[str, Any]]], lower: float, upper: float) -> bytes | None:
    """Scatter of predicted max force deviation vs true max force error per labelled frame, log-log."""
    pairs = {i: [(e[MAX_FORCE_DEVIATION], e["max_force_error"]) for e in rows
                 if e.get(MAX_FORCE_DEVIATION) and e[MAX_FORCE_DEVIATION] > 0 and e["max_force_error"] > 0]
             for i, rows in errors.items()}
    pairs = {i: p for i, p in pairs.items() if p}
    if not pairs:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for colour, (i, p) in zip(_colours(len(pairs)), sorted(pairs.items()), strict=True):
        ax.scatter([a for a, _ in p], [b for _, b in p], color=colour, s=18, label=f"iteration {i}")
    values = np.array([v for p in pairs.values() for pair in p for v in pair])
    lo, hi = values.min() / 2, values.max() * 2
    ax.plot([lo, hi], [lo, hi], "k:", lw=1, label="error = deviation")
    for level, name in ((lower, "lower"), (upper, "upper")):
        if lo < level < hi:
            ax.axvline(level, color="grey", lw=0.8, ls="--")
            ax.text(level, hi, f" {name}", fontsize=8, va="top", color="grey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("predicted max force deviation (eV/Å)")
    ax.set_ylabel("true max force error (eV/Å)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_calibration(errors: dict[int, list[dict[str, Any]]]) -> bytes | None:
    """Two log-log panels per labelled frame: raw (α = 1) and calibrated force deviation at selection time vs
    the true force error, both RMS over the frame's atoms of the per-atom values (eV/Å; a calibrated committee
    has E|ΔF_i|² = c_i², so the diagonal is perfect calibration), coloured by iteration."""
    panels = {"raw_rms_force_deviation": "before: raw committee deviation (alpha = 1)",
              "rms_force_deviation": "after: calibrated deviation (the map in force)"}
    data = {key: {i: [(e[key], e["rms_force_error"]) for e in rows if e.get(key) and e[key] > 0
                      and e.get("rms_force_error") and e["rms_force_error"] > 0] for i, rows in errors.items()}
            for key in panels}
    if not any(p for d in data.values() for p in d.values()):
        return None
    values = np.array([v for d in data.values() for p in d.values() for pair in p for v in pair])
    lo, hi = values.min() / 2, values.max() * 2
    fig = _figure(11.0, 4.5)
    for k, (key, title) in enumerate(panels.items()):
        ax = fig.add_subplot(1, 2, k + 1)
        pairs = {i: p for i, p in data[key].items() if p}
        for colour, (i, p) in zip(_colours(len(pairs)), sorted(pairs.items()), strict=True):
            ax.scatter([a for a, _ in p], [b for _, b in p], color=colour, s=16, label=f"iteration {i}")
        ax.plot([lo, hi], [lo, hi], "k:", lw=1, label="error = deviation")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_title(title, fontsize=9)
        from matplotlib.ticker import NullFormatter

        for axis in (ax.xaxis, ax.yaxis):  # decade labels only (minor labels overlap on short ranges)
            axis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("predicted force deviation, RMS over atoms (eV/Å)")
        ax.set_ylabel("true force error |ΔF|, RMS over atoms (eV/Å)")
        ax.grid(alpha=0.3, which="both")
        if pairs:
            ax.legend(fontsize=7)
    return _png(fig)


def plot_uncertainty_histograms(scores: dict[int, list[float]], lower: float, upper: float) -> bytes | None:
    """Histogram of log max force deviation of every explored frame, one line per iteration."""
    data = {i: np.array([v for v in vals if v is not None and np.isfinite(v) and v > 0]) for i, vals in scores.items()}
    data = {i: v for i, v in data.items() if v.size}
    if not data:
        return None
    allv = np.concatenate(list(data.values()))
    lo, hi = min(allv.min(), lower) / 1.5, max(allv.max(), upper) * 1.5
    bins = np.geomspace(lo, hi, 40)
    fig = _figure()
    ax = fig.add_subplot()
    for colour, (i, v) in zip(_colours(len(data)), sorted(data.items()), strict=True):
        ax.hist(v, bins=bins, histtype="step", lw=1.5, color=colour, label=f"iteration {i} ({v.size} frames)")
    for level, name in ((lower, "lower"), (upper, "upper")):
        ax.axvline(level, color="grey", lw=0.8, ls="--")
        ax.text(level, 1, f" {name}", transform=ax.get_xaxis_transform(), fontsize=8, va="top", color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("max force deviation (eV/Å)")
    ax.set_ylabel("explored frames")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_gate(rows: list[dict[str, Any]], name: str) -> bytes | None:
    """One physics gate (alflow.gates): each checked error / its tolerance vs oracle labels, log y; 1 = the limit."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        g = (r.get("gates") or {}).get(name) or {}
        for key, tol in (g.get("tolerances") or {}).items():
            err = (g.get("errors") or {}).get(key)
            if err is not None and tol:
                series.setdefault(key, []).append((r["labels_total"], max(err / tol, 1e-6)))
    if not series:
        return None
    fig = _figure(6.0, 3.5)
    ax = fig.add_subplot()
    for key, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=key)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.text(0.0, 1.0, " tolerance", transform=ax.get_yaxis_transform(), fontsize=8, va="bottom", color="grey")
    ax.set_yscale("log")
    ax.set_xlabel("oracle labels of the run")
    ax.set_ylabel("error / tolerance")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _png(fig)


def gate_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the gates table: per iteration and gate, held/FAILED and each error vs tolerance."""
    head = ["iter", "labels", "gate", "held", "errors (vs tolerance)", "model", "oracle"]
    body = []
    for r in rows:
        for name, g in (r.get("gates") or {}).items():
            errs, tols = g.get("errors") or {}, g.get("tolerances") or {}
            text = ", ".join(f"{k} {_fmt(v, '.3g')}" + (f" (<= {_fmt(tols[k], '.3g')})" if k in tols else "")
                             for k, v in errs.items()) or (g.get("message") or "")
            body.append([str(r["iteration"]), str(r["labels_total"]), name, "held" if g.get("passed") else "FAILED",
                         text, _gate_summary(g.get("model")), _gate_summary(g.get("reference"))])
    return head, body


def _gate_summary(values: dict[str, Any] | None) -> str:
    """The scalar values of a gate's property (V0, B, C11, ...), for the table."""
    return ", ".join(f"{k} {_fmt(float(v), '.4g')}" for k, v in (values or {}).items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool))


def plot_walker_status(statuses: dict[int, dict[str, int]]) -> bytes | None:
    """Stacked bars: walkers per stop status and iteration."""
    if not statuses:
        return None
    its = sorted(statuses)
    names = sorted({s for c in statuses.values() for s in c}, key=lambda s: (s not in STATUS_COLOURS, s))
    fig = _figure(6.0, 3.5)
    ax = fig.add_subplot()
    bottom = np.zeros(len(its))
    for name in names:
        counts = np.array([statuses[i].get(name, 0) for i in its], dtype=float)
        ax.bar(its, counts, bottom=bottom, label=name, color=STATUS_COLOURS.get(name))
        bottom += counts
    from matplotlib.ticker import MaxNLocator

    ax.set_xticks(its)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration")
    ax.set_ylabel("walkers")
    ax.legend(fontsize=8)
    return _png(fig)


# ----------------------------------------------------------------------------------------- tables


def _fmt(value: Any, spec: str = ".4f", factor: float = 1.0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value * factor, spec) if np.isfinite(value) else "-"
    return str(value)


def iteration_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-iteration table (fractions in %, E in meV/atom, F in eV/Å, times in s)."""
    head = ["iter", "frames trained", "explored", "accurate %", "candidate %", "failed %", "selected", "labels added",
            "label failures", "valid E MAE meV/atom", "valid F RMSE eV/Å", "new-frame F RMSE eV/Å", "alpha",
            "train s", "train epochs", "explore s", "label s",
            "new-frame miscal. area raw/cal", "new-frame NLL raw/cal", "new-frame Spearman", "trust coverage %",
            "walkers", "stop"]
    body = []
    for r in rows:
        sec = r.get("seconds", {})
        body.append([str(r["iteration"]), str(r["dataset_size"]), str(r["n_explored"]),
                     _fmt(r["accurate_fraction"], ".1f", 100), _fmt(r["candidate_fraction"], ".1f", 100),
                     _fmt(r["failed_fraction"], ".1f", 100), str(r["n_selected"]),
                     str(r["labels_added"]) if r.get("labelled") else "-", str(r["label_failures"]),
                     _fmt(r.get("valid_energy_mae"), ".2f", 1e3), _fmt(r.get("valid_forces_rmse")),
                     _fmt(r.get("new_forces_rmse")), _fmt(r.get("alpha"), ".3g"), _fmt(sec.get("train"), ".1f"),
                     _fmt(r.get("train_epochs")),
                     _fmt(sec.get("explore"), ".1f"), _fmt(sec.get("label"), ".1f"),
                     f"{_fmt(r.get('calib_miscalibration_area_raw'), '.2f')}/{_fmt(r.get('calib_miscalibration_area'), '.2f')}",
                     f"{_fmt(r.get('calib_nll_raw'), '.2f')}/{_fmt(r.get('calib_nll'), '.2f')}",
                     _fmt(r.get("calib_spearman"), ".2f"), _fmt(r.get("trust_coverage"), ".0f", 100),
                     " ".join(f"{k}:{v}" for k, v in sorted(r.get("walker_status", {}).items())), r.get("stop") or ""])
    return head, body


def _md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _html_table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


# ----------------------------------------------------------------------------------------- report


def collect(run_dir: str | Path) -> dict[str, Any]:
    """Everything the report shows, from the run directory (works on unfinished runs)."""
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    config = _read_json_yaml(run_dir / "config.yaml")
    selection = config.get("selection", {})
    lower, upper = float(selection.get("lower", 0.05)), float(selection.get("upper", 0.5))
    errors, scores, statuses = {}, {}, {}
    for i, _res in _iterations(state, "label"):
        errors[i] = _read_json(run_dir / f"iter_{i:03d}" / "label" / "errors.json", [])
    for i, _res in _iterations(state, "select"):
        scores[i] = _read_json(run_dir / f"iter_{i:03d}" / "select" / "scores.json", {}).get(MAX_FORCE_DEVIATION, [])
    for i, res in _iterations(state, "explore"):
        statuses[i] = dict(Explored.from_dict(res).statuses)
    stored = (state.get("stages", {}).get("initial") or {}).get("result")
    initial = Initial.from_dict(stored) if stored is not None else None
    return {"run_dir": run_dir, "state": state, "config": config, "lower": lower, "upper": upper, "errors": errors,
            "scores": scores, "statuses": statuses, "initial": initial, "rows": state.get("iterations", [])}


def _read_json_yaml(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _summary_lines(data: dict[str, Any]) -> list[tuple[str, str]]:
    state, rows, initial = data["state"], data["rows"], data["initial"]
    stage_seconds = sum(rec.get("seconds", 0.0) for rec in state.get("stages", {}).values())
    final = state.get("final_model")
    return [
        ("run", f"{state.get('name', data['config'].get('name', '?'))} in {data['run_dir']}"),
        ("status", str(state.get("status", "new"))),
        ("iterations", str(len(rows))),
        ("initial dataset", f"{initial.dataset_size} frames ({initial.n_imported} imported, "
                            f"{initial.n_labelled} labelled)" if initial else "-"),
        ("oracle labels", str(rows[-1]["labels_total"] if rows else initial.n_labelled if initial else 0)),
        ("final model", str(data["run_dir"] / final) if final else "-"),
        ("trust window", f"[{data['lower']:g}, {data['upper']:g}) eV/Å"),
        ("sessions", str(len(state.get("sessions", [])))),
        ("time in stages", f"{stage_seconds:.1f} s"),
    ] + ([("foundation E0 shift", ", ".join(f"{el} {v:+.4f} eV" for el, v in shift.items())
           + f"; scale {rows[-1].get('foundation_scale', 1.0):.4g} (alflow.foundation)")]
         if rows and (shift := rows[-1].get("foundation_e0_shift")) else [])


def render_markdown(data: dict[str, Any], figures: dict[str, str] | None = None) -> str:
    """Markdown text of the report; ``figures`` maps figure names to image links (None: no images)."""
    lines = [f"# alflow report: {data['state'].get('name', '')}", ""]
    lines += [f"- **{k}**: {v}" for k, v in _summary_lines(data)]
    lines += ["", "## Iterations", ""]
    head, body = iteration_table(data["rows"])
    lines += [_md_table(head, body) if body else "No finished iteration yet.", ""]
    gate_head, gate_body = gate_table(data["rows"])
    if gate_body:
        lines += ["## Convergence gates", "", _md_table(gate_head, gate_body), ""]
    for name, title in _figure_titles(data["rows"]).items():
        if figures is not None and name in figures:
            lines += [f"## {title}", "", f"![{title}]({figures[name]})", ""]
    return "\n".join(lines)


def render_html(data: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """One self-contained HTML page (figures as base64 data URIs)."""
    title = html.escape(f"alflow report: {data['state'].get('name', '')}")
    summary = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _summary_lines(data))
    head, body = iteration_table(data["rows"])
    parts = [f"<h1>{title}</h1>", f"<table class='summary'>{summary}</table>", "<h2>Iterations</h2>",
             _html_table(head, body) if body else "<p>No finished iteration yet.</p>"]
    gate_head, gate_body = gate_table(data["rows"])
    if gate_body:
        parts += ["<h2>Convergence gates</h2>", _html_table(gate_head, gate_body)]
    for name, fig_title in _figure_titles(data["rows"]).items():
        if name in pngs:
            b64 = base64.b64encode(pngs[name]).decode()
            parts += [f"<h2>{html.escape(fig_title)}</h2>",
                      f"<img alt='{html.escape(fig_title)}' src='data:image/png;base64,{b64}'>"]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;text-align:right}"
             "table.summary th,table.summary td{text-align:left}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def _gate_names(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(n for r in rows for n in (r.get("gates") or {})))


def _figure_titles(rows: list[dict[str, Any]]) -> dict[str, str]:
    """FIGURES plus one ``gate_<name>`` figure per gate that appears in the rows."""
    return {**FIGURES, **{f"gate_{n}": f"Gate {n}: error / tolerance vs labels" for n in _gate_names(rows)}}


def make_figures(data: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes of every figure that has data."""
    out = {
        "learning_curve": plot_learning_curve(data["rows"]),
        "uncertainty_vs_error": plot_uncertainty_vs_error(data["errors"], data["lower"], data["upper"]),
        "calibration": plot_calibration(data["errors"]),
        "uncertainty_histograms": plot_uncertainty_histograms(data["scores"], data["lower"], data["upper"]),
        "walker_status": plot_walker_status(data["statuses"]),
        **{f"gate_{n}": plot_gate(data["rows"], n) for n in _gate_names(data["rows"])},
    }
    return {k: v for k, v in out.items() if v is not None}


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md``, ``report.html`` and ``report/*.png`` in ``run_dir``; returns the HTML path."""
    run_dir = Path(run_dir)
    if not (run_dir / "state.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no state.json here; not an alflow run directory (or nothing ran yet)")
    data = collect(run_dir)
    pngs = make_figures(data)
    fig_dir = run_dir / "report"
    fig_dir.mkdir(exist_ok=True)
    for name, png in pngs.items():
        (fig_dir / f"{name}.png").write_bytes(png)
    links = {name: f"report/{name}.png" for name in pngs}
    atomic_write_text(run_dir / "report.md", render_markdown(data, links))
    atomic_write_text(run_dir / "report.html", render_html(data, pngs))
    return run_dir / "report.html"
