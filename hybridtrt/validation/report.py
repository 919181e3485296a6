"""Writing a validation report: ``report.json``, a per-layer error picture (PNG), the FP8
sensitivity picture when there is one, and a small self-contained HTML page showing them with the
tables, each tensor's bound and where the numbers come from (export, checkpoint sha256, versions,
date).

Reports are published whole or not at all (`publish`): every file is written and fsynced under a
temporary name in its own directory, then all are renamed into place. A full disk (or any other
write error) raises `ReportWriteError`, removes the temporary files and leaves the previous report
as it was.
"""

from __future__ import annotations

import base64
import datetime
import errno
import html
import io
import json
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from hybridtrt.errors import HybridTrtError, MissingDependencyError
from hybridtrt.files import fsync_dir, human_bytes
from hybridtrt.judge.routing import per_layer_text
from hybridtrt.judge.tolerances import gate
from hybridtrt.validation.runner import Report

if TYPE_CHECKING:
    from hybridtrt.validation.sensitivity import Sensitivity

_KIND_OF = (
    ("layer_output.", "layer output"),
    ("present_conv_state.", "conv state"),
    ("present_ssm_state.", "ssm state"),
    (".key", "key"),
    (".value", "value"),
)
_FLOOR = 1e-16  # log-scale floor for exact zeros (fp64 resolution of 1 - cosine)


class ReportWriteError(HybridTrtError):
    """A report could not be written (a full disk, a read-only file system); nothing was replaced."""

    stage = "report"


def _write(path: Path, data: bytes) -> None:
    """The one place report bytes reach the disk: write, flush, fsync."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())




def publish(files: dict[Path, bytes]) -> None:
    """Write ``{path: bytes}`` as one report: every file under a temporary name beside its final one
    (same directory, so the rename is atomic and needs no space), then every rename. On an error
    the temporary files are removed and the previous files stay as they were.

    Raises:
        ReportWriteError: A write failed (ENOSPC and EDQUOT say the disk is full and how much the
            report needs).
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # keeps the suffix
            staged.append((tmp, path))
            _write(tmp, data)
    except OSError as e:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        where = staged[-1][1] if staged else next(iter(files))
        need = human_bytes(sum(len(d) for d in files.values()))
        kept = "; the previous files there are unchanged"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ReportWriteError(
                f"no space left on the device writing {where} (the report needs {need}){kept}",
                fix=f"free space on {where.parent}'s file system, or write the report elsewhere (--report DIR / --json FILE)",
            ) from None
        raise ReportWriteError(f"cannot write {where}: {e.strerror or e}{kept}", fix="write the report somewhere you can write to") from None
    for tmp, path in staged:
        os.replace(tmp, path)
    for parent in {path.parent for path in files}:
        fsync_dir(parent)


def provenance(export_dir: str | Path | None, checkpoint: str | Path | None = None) -> dict[str, str]:
    """Where a report's numbers come from: the export (and its graph's sha256), its source
    checkpoint and sha256 as ``hybridtrt.json`` records them (validation refuses another checkpoint
    unless forced, and then says so in the notes), the hybridtrt versions that exported and
    validated, and the date (UTC)."""
    import hybridtrt

    out: dict[str, str] = {}
    if export_dir is not None and (Path(export_dir) / "hybridtrt-tp.json").is_file() and not (Path(export_dir) / "hybridtrt.json").exists():
        from hybridtrt.exporter.tensor_parallel import read_tp_manifest

        top, _ = read_tp_manifest(export_dir, integrity=None)
        out["export"] = f"{Path(export_dir).resolve()} ({top['tensor_parallel']['world']} ranks, hybridtrt-tp.json)"
        out["checkpoint"] = str(checkpoint or top["source"].get("checkpoint"))
        out["checkpoint sha256"] = str(top["source"].get("sha256", "not recorded"))
        out["exported by"] = f"hybridtrt {top['tools'].get('hybridtrt', '?')}"
    elif export_dir is not None:
        from hybridtrt.exporter.manifest import read_manifest

        m = read_manifest(export_dir, integrity=None)  # the validation already checked the files
        graph = m.graphs["unified"].file
        sha = (getattr(m, "files", None) or {}).get(graph, {}).get("sha256")
        out["export"] = str(Path(export_dir).resolve()) + (f" ({graph} sha256 {sha})" if sha else "")
        out["checkpoint"] = str(checkpoint or m.source.get("checkpoint"))
        out["checkpoint sha256"] = str(m.source.get("sha256", "not recorded"))
        out["exported by"] = f"hybridtrt {m.tools.get('hybridtrt', '?')}"
    elif checkpoint is not None:
        out["checkpoint"] = str(checkpoint)
    out["validated by"] = f"hybridtrt {hybridtrt.__version__}"
    out["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return out


def _kind(name: str) -> str:
    for needle, kind in _KIND_OF:
        if needle in name:
            return kind
    return name


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("matplotlib (a hybridtrt dependency) is not importable", fix="pip install matplotlib, or reinstall hybridtrt with its dependencies") from None
    return plt


def plot_report(report: Report, path: Path | IO[bytes]) -> Path | IO[bytes]:
    """Per-layer (or, without per-layer data, per-phase) errors on log scales.

    Top: rel L2 per layer and state. Bottom: 1 − cosine. Gate lines dashed; failing points red;
    hollow markers are the yardstick's error on the same tensors (the gate allows a multiple of it).
    """
    plt = _pyplot()
    layer_checks = [c for c in report.checks if c.phase == "layer"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    if layer_checks:
        checks, xlabel = layer_checks, "decoder layer"
        xs = lambda c: c.layer  # noqa: E731
        g = gate(report.precision, "layer")
    else:
        checks = [c for c in report.checks if c.name == "logits"]
        xlabel = "decode step (0 = prefill)"
        xs = lambda c: c.step or 0  # noqa: E731
        g = gate(report.precision, "steps")
    series: dict[str, list] = {}
    for c in checks:
        series.setdefault(_kind(c.name), []).append(c)
    markers = "osD^vx"
    for (kind, cs), marker in zip(sorted(series.items()), markers):
        x = [xs(c) for c in cs]
        rel = [c.comparison.rel_l2 if c.comparison.finite else float("nan") for c in cs]
        cos = [1 - c.comparison.cosine if c.comparison.finite else float("nan") for c in cs]
        # Only the layer output exists at every layer; states exist at some, so no connecting lines.
        style = "-" if kind in ("layer output", "logits") else "none"
        (line,) = ax1.plot(x, [max(v, _FLOOR) for v in rel], marker=marker, linestyle=style, label=kind, alpha=0.8, markersize=7)
        ax2.plot(x, [max(v, _FLOOR) for v in cos], marker=marker, linestyle=style, label=kind, alpha=0.8, markersize=7)
        yard = [(xs(c), c.yardstick) for c in cs if c.yardstick is not None and c.yardstick.finite]
        if yard:  # the yardstick's own error on the same tensors: what the precision causes anyway
            ax1.plot([p for p, _ in yard], [max(y.rel_l2, _FLOOR) for _, y in yard], marker=marker, markerfacecolor="none",
                     linestyle=":" if style == "-" else "none", color=line.get_color(), alpha=0.6, markersize=9,
                     label=f"{kind} ({report.yardstick})")  # fmt: skip
            ax2.plot([p for p, _ in yard], [max(1 - y.cosine, _FLOOR) for _, y in yard], marker=marker, markerfacecolor="none",
                     linestyle=":" if style == "-" else "none", color=line.get_color(), alpha=0.6, markersize=9)  # fmt: skip
        bad = [c for c in cs if not c.passed]
        if bad:
            ax1.scatter([xs(c) for c in bad], [max(c.comparison.rel_l2, _FLOOR) if c.comparison.finite else 1.0 for c in bad], s=160, facecolors="none", edgecolors="red", linewidths=2, zorder=5)
            ax2.scatter([xs(c) for c in bad], [max(1 - c.comparison.cosine, _FLOOR) if c.comparison.finite else 1.0 for c in bad], s=160, facecolors="none", edgecolors="red", linewidths=2, zorder=5)
    gates = [("", g, "--")]
    if layer_checks and gate(report.precision, "state") != g:
        gates.append(("states ", gate(report.precision, "state"), ":"))
    for label, gg, style in gates:
        if gg.max_rel_l2:
            what = "floor" if report.yardstick and gg.yardstick_ratio else "gate"
            ax1.axhline(gg.max_rel_l2, color="gray", linestyle=style, label=f"{label}{what} {gg.max_rel_l2:g}")
        if gg.min_cosine:
            ax2.axhline(1 - gg.min_cosine, color="gray", linestyle=style, label=f"{label}gate cos ≥ {gg.min_cosine:g}")
    for ax, label in ((ax1, "rel L2  ‖a−b‖/‖b‖"), (ax2, "1 − cosine")):
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", ncol=3)
    ax2.set_xlabel(xlabel)
    verdict = "PASS" if report.passed else "FAIL"
    where = ""
    if report.first_divergence:
        where = f" — first divergence: layer {report.first_divergence['layer']} {report.first_divergence['tensor']}"
    fig.suptitle(f"{report.backend} vs {report.reference} ({report.precision}): {verdict}{where}", fontsize=11)
    if layer_checks:
        ticks = sorted({c.layer for c in layer_checks})
        kinds = {"M": "mamba", "*": "attn", "-": "mlp", "E": "moe"}
        labels = [f"{i}\n{kinds.get(report.pattern[i], '')}" if i < len(report.pattern) else str(i) for i in ticks]
        ax2.set_xticks(ticks, labels)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


_KIND_COLORS = {"mamba": "tab:blue", "attention": "tab:orange", "mlp": "tab:green", "moe": "tab:purple"}


def plot_sensitivity(sens: Sensitivity, path: Path | IO[bytes]) -> Path | IO[bytes]:
    """Quantization sensitivity: 1 − cosine of the logits with only that layer quantized, one bar per
    quantized linear in layer order, coloured by kind (log scale). Bars of the layers the
    suggested ``--exclude`` flags keep unquantized are outlined red; the dashed line is the
    whole-model target, the dotted one the all-quantized error."""
    plt = _pyplot()
    layers = sorted(sens.layers, key=lambda s: (s.layer if s.layer is not None else 1 << 30, s.node))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.32 * len(layers) + 2), 4.8))
    x = list(range(len(layers)))
    heights = [max(s.error, _FLOOR) if s.comparison.finite else 1.0 for s in layers]
    colors = [_KIND_COLORS.get(s.kind, "tab:gray") for s in layers]
    excluded = set(sens.exclude)
    ax.bar(x, heights, color=colors, edgecolor=["red" if s.node in excluded else "none" for s in layers], linewidth=2)
    from matplotlib.patches import Patch

    ax.axhline(1 - sens.target_cosine, color="gray", linestyle="--", label=f"target: whole model 1 − cos = {1 - sens.target_cosine:.0e}")
    if sens.full.finite:
        ax.axhline(max(1 - sens.full.cosine, _FLOOR), color="black", linestyle=":", label=f"all quantized: {1 - sens.full.cosine:.1e}")
    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color=c, label=k) for k, c in _KIND_COLORS.items() if any(s.kind == k for s in layers)]
    ax.set_yscale("log")
    ax.set_ylabel("1 − cosine of logits (only this layer FP8)")
    ax.set_xticks(x, [s.label for s in layers], rotation=60, ha="right", fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    title = f"{sens.scheme.upper()} sensitivity per linear layer — {len(sens.exclude)} excluded (red) reach cosine ≥ {sens.target_cosine:g}"
    if sens.reached is None:
        title = f"{sens.scheme.upper()} sensitivity per linear layer — cosine {sens.target_cosine:g} is out of reach"
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def _sensitivity_html(sens: Sensitivity, img: str) -> str:
    rows = "".join(
        f"<tr{' class=bad' if s.node in sens.exclude else ''}><td>{i + 1}</td><td>{html.escape(s.label)}</td><td>{html.escape(s.kind)}</td>"
        f"<td>{s.error:.2e}</td><td>{s.comparison.rel_l2:.2e}</td><td>{'' if s.comparison.top1 is None else f'{s.comparison.top1:.2f}'}</td></tr>"
        for i, s in enumerate(sens.layers)
    )
    kinds = "".join(
        f"<tr><td>{html.escape(r['kind'])}</td><td>{html.escape(r['projection'])}</td><td>{r['count']}</td><td>{r['worst']:.2e}</td><td>{r['median']:.2e}</td></tr>"
        for r in sens.by_kind()
    )
    verdict = (
        f"out of reach (nothing quantized: cosine {sens.none.cosine:.6f})" if sens.reached is None
        else f"cosine {sens.reached.cosine:.6f} with {len(sens.exclude)} layer(s) excluded"
    )
    return f"""<h2>{sens.scheme.upper()} sensitivity</h2>
<p>Logits with only one linear layer quantized, against the fp32 reference. All quantized: cosine {sens.full.cosine:.6f};
target {sens.target_cosine:g}: {html.escape(verdict)}.</p>
<pre>{html.escape(sens.command)}</pre>
<img alt="{sens.scheme.upper()} sensitivity" src="data:image/png;base64,{img}">
<table><tr><th>kind</th><th>projection</th><th>layers</th><th>worst 1 − cos</th><th>median 1 − cos</th></tr>{kinds}</table>
<table><tr><th>#</th><th>layer</th><th>kind</th><th>1 − cos</th><th>rel L2</th><th>top-1</th></tr>{rows}</table>
"""


def _rows_html(report: Report) -> str:
    rows = []
    for c in report.checks:
        cmp, yard = c.comparison, c.yardstick
        cls = "ok" if c.passed else "bad"
        rows.append(
            f"<tr class={cls}><td>{html.escape(c.phase)}</td><td>{'' if c.step is None else c.step}</td><td>{'' if c.layer is None else c.layer}</td>"
            f"<td>{html.escape(c.name)}</td><td>{cmp.rel_l2:.2e}</td><td>{'—' if yard is None else f'{yard.rel_l2:.2e}'}</td>"
            f"<td>{'—' if c.allowed is None else f'{c.allowed:.2e}'}</td><td>{cmp.cosine:.8f}</td><td>{cmp.max_abs:.2e}</td>"
            f"<td>{'' if cmp.top1 is None else f'{cmp.top1:.3f}'}</td><td>{html.escape('; '.join(c.failures)) or 'ok'}</td></tr>"
        )
    return "\n".join(rows)


def _png(plot: Any, *args: Any) -> bytes:
    buf = io.BytesIO()
    plot(*args, buf)
    return buf.getvalue()


def write_report(report: Report, out_dir: str | Path, *, provenance: dict[str, str] | None = None) -> dict[str, Path]:
    """Write ``report.json``, ``errors.png`` (+ ``sensitivity.png``) and ``report.html`` into
    ``out_dir``, all or none (`publish`).

    Args:
        report: What the validation found.
        out_dir: The report directory (created).
        provenance: ``{what: value}`` shown at the top of the page and stored in the JSON
            (`provenance`: export, checkpoint and its sha256, versions, date).

    Raises:
        ReportWriteError: The disk is full (or the directory not writable); the previous report is unchanged.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportWriteError(f"cannot create the report directory {out}: {e.strerror or e}", fix="write the report somewhere you can write to") from None
    paths = {"json": out / "report.json", "png": out / "errors.png", "html": out / "report.html"}
    record = {**report.to_dict(), "provenance": dict(provenance or {})}
    files = {paths["json"]: (json.dumps(record, indent=2, default=float) + "\n").encode(), paths["png"]: _png(plot_report, report)}
    img = base64.b64encode(files[paths["png"]]).decode()
    extra = ""
    sens = report.extras.get("sensitivity")
    if sens is not None:
        paths["sensitivity_png"] = out / "sensitivity.png"
        files[paths["sensitivity_png"]] = _png(plot_sensitivity, sens)
        extra = _sensitivity_html(sens, base64.b64encode(files[paths["sensitivity_png"]]).decode())
    origin = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in (provenance or {}).items())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    verdict = "PASS" if report.passed else "FAIL"
    summary = [
        ("verdict", verdict),
        ("backend / reference", f"{report.backend} / {report.reference}"),
        ("precision", report.precision),
        ("batch, prompt lengths", f"{report.batch}, {report.prompt_lengths}"),
        ("decode steps", report.steps),
        ("greedy token agreement", f"{report.token_agreement:.3f}" if report.token_agreement is not None else "—"),
        ("teacher-forced top-1", f"{report.teacher_forced_top1:.3f}" if report.teacher_forced_top1 is not None else "—"),
        ("first divergence", json.dumps(report.first_divergence) if report.first_divergence else "none"),
        ("MoE routing", routing_line(report) if report.routing else "—"),
        *(("routing gate", why) for why in report.routing_failures),
        *_quality_summary(report.quality),
        ("time reference / backend", f"{report.timings.get('reference_s', 0):.2f} s / {report.timings.get('backend_s', 0):.2f} s"),
    ]
    summary_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>hybridtrt validation: {verdict}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ background: #f4f4f4; text-align: left; }}
tr.bad td {{ background: #fde2e2; }}
h1 .PASS {{ color: #1a7f37; }} h1 .FAIL {{ color: #cf222e; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
</style></head><body>
<h1>hybridtrt validation: <span class="{verdict}">{verdict}</span></h1>
<table>{summary_html}</table>
{f"<h2>Provenance</h2><table>{origin}</table>" if origin else ""}
{f"<ul>{notes}</ul>" if notes else ""}
<img alt="per-layer errors" src="data:image/png;base64,{img}">
{extra}
<h2>All comparisons</h2>
<p>rel L2 = ‖backend − reference‖ / ‖reference‖; yardstick: {html.escape(report.yardstick or "none ran")}'s rel L2 on the same tensor;
allowed: the tensor's bound, max(floor, ratio × yardstick) (hybridtrt/judge/tolerances.json).</p>
{_ROWS_HEAD}
{_rows_html(report)}
</table>{_quality_html(report.quality)}</body></html>
"""
    files[paths["html"]] = page.encode()
    publish(files)
    return paths


#: Header row of a table of `_rows_html`.
_ROWS_HEAD = "<table><tr>" + "".join(f"<th>{h}</th>" for h in ("phase", "step", "layer", "tensor", "rel L2", "yardstick", "allowed", "cosine", "max abs", "top-1", "gate")) + "</tr>"


def _quality_summary(quality) -> list[tuple[str, str]]:
    """Summary rows of an FP8 recipe's cost (`Report.quality`), none for other precisions."""
    if quality is None:
        return []
    logits = [c for c in quality.checks if c.name == "logits"]
    cosine = min((c.comparison.cosine for c in logits), default=float("nan"))
    what = "INT4 recipe" if quality.precision == "int4-recipe" else "FP8 recipe"
    return [
        (f"{what} vs the unquantized truth", f"{'within' if quality.passed else 'BEYOND'} its gates (yardstick {quality.yardstick or 'none'})"),
        (f"{what}: worst logits cosine", f"{cosine:.6f}"),
    ]


def _quality_html(quality) -> str:
    if quality is None:
        return ""
    return f"""
<h2>{"INT4" if quality.precision == "int4-recipe" else "FP8"} recipe: {html.escape(quality.backend)} vs the unquantized {html.escape(quality.reference)}</h2>
<p>What the recipe costs, on the same prompts; yardstick: {html.escape(quality.yardstick or "none ran")} ({
"the same layers rounded to nearest, no AWQ scales; AWQ scales that cost more than plain rounding fail here" if quality.precision == "int4-recipe"
else "the same layers quantized with ideal per-call scales, nothing calibrated; a calibrated scale that clips fails here"}).</p>
{_ROWS_HEAD}
{_rows_html(quality)}
</table>"""


def routing_line(report) -> str:
    """How MoE routing was judged: held to the reference's choices, and per layer the backend's own
    choices that differ (the yardstick's in brackets) against the number allowed."""
    yard = report.yardstick is not None and any(r.get("yardstick_flipped") is not None for r in report.routing.values())
    per_layer = per_layer_text(report.routing, yard)
    if report.routing_held_to == "backend":
        return f"MoE routing: the reference held to the recording's expert choices for the gates above; its choices differing from the reference's own per layer: {per_layer}"
    return (
        f"MoE routing held to the reference's expert choices for the gates above; the backend's own choices "
        f"differing per layer{' (' + str(report.yardstick) + ')' if yard else ''}: {per_layer}"
    )
