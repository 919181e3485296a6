"""Shared CLI pieces: the console, step progress, tables and argument groups."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from hybridtrt.files import human_bytes  # noqa: F401  (the CLI's size format; re-exported)

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Spinner while ``name`` runs, then a ✓ line with its wall time."""
    start = time.perf_counter()
    with console.status(f"[bold]{escape(name)}[/] …", spinner="dots"):
        yield
    console.print(f"[green]✓[/] {escape(name)} [dim]({time.perf_counter() - start:.1f} s)[/]")


def styled(text: object, style: str) -> Text:
    """A table cell or message shown literally (never parsed as markup) in ``style``."""
    return Text(str(text), style=style)


#: A wrapped text cell never gets narrower than this (a longer word — a path — folds at this width).
MIN_TEXT_WIDTH = 24


def _cell(x: object) -> Text:
    return x if isinstance(x, Text) else Text(str(x))


def _longest_line(t: Text) -> int:
    return max((Text(line).cell_len for line in t.plain.split("\n")), default=0)


def _longest_word(t: Text) -> int:
    return max((Text(word).cell_len for word in t.plain.split()), default=0)


class FittedTable:
    """A table that fits the width it is printed at (a terminal's, or 80 in a pipe or a log).

    Cells and headers wrap at spaces only: every column gets at least its longest word (a number,
    a tensor name; at most `MIN_TEXT_WIDTH`: a longer word, such as a path, folds at that width),
    and the widest columns give way first. When even that does not fit, the table is printed
    vertically: one block per row, each column's header beside its value. Nothing is ever cut to an
    ellipsis or folded into a stack of two-character fragments.
    """

    def __init__(self, title: str, columns: list[str], rows: list[list[object]], *, numeric: bool = True) -> None:
        self.title = title
        self.headers = [Text(c) for c in columns]
        self.rows = [[_cell(x) for x in r] for r in rows]
        self.numeric = numeric

    def _widths(self, i: int) -> tuple[int, int]:
        """``(minimum, natural)`` content width of column ``i``."""
        cells = [self.headers[i], *(r[i] for r in self.rows if i < len(r))]
        natural = max(map(_longest_line, cells))
        words = max(map(_longest_word, cells))
        return min(natural, max(min(words, MIN_TEXT_WIDTH), 1)), natural

    def horizontal(self, width: int) -> Table | None:
        """The table at ``width`` columns, or None when it cannot fit without breaking a cell."""
        n = len(self.headers)
        available = width - (3 * n + 1)  # borders (n + 1) and one space of padding each side
        ranges = [self._widths(i) for i in range(n)]
        if sum(lo for lo, _ in ranges) > available:
            return None
        widths = [hi for _, hi in ranges]
        excess = sum(widths) - available
        while excess > 0:  # narrow the widest wrappable column, never below its minimum
            candidates = [i for i, (lo, _) in enumerate(ranges) if widths[i] > lo]
            i = max(candidates, key=lambda k: widths[k])
            widths[i] -= 1
            excess -= 1
        fixed = sum(hi for _, hi in ranges) > available
        t = Table(title=Text(self.title), title_justify="left", show_header=any(h.plain for h in self.headers))
        for i, (header, w) in enumerate(zip(self.headers, widths)):
            right = self.numeric and i > 0
            t.add_column(header, justify="right" if right else "left", overflow="fold", width=w if fixed else None)
        for r in self.rows:
            t.add_row(*r)
        return t

    def vertical(self) -> Group:
        """One block per row: its first cell as a heading, then each other column's header and value."""
        parts: list[object] = [Text(self.title)]
        for r in self.rows:
            head = Text.assemble(f"{self.headers[0].plain}: " if self.headers[0].plain else "", r[0])
            head.stylize("bold")
            parts.append(head)
            grid = Table.grid(padding=(0, 2), pad_edge=True)
            grid.add_column(no_wrap=True)
            grid.add_column(overflow="fold")
            for header, value in zip(self.headers[1:], r[1:]):
                grid.add_row(header.copy(), value)
            parts.append(grid)
        return Group(*parts)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.horizontal(options.max_width) or self.vertical()


def table(title: str, columns: list[str], rows: list[list[object]], *, numeric: bool = True) -> FittedTable:
    """A rich table with the given columns that fits the console it is printed on (80 columns in a
    pipe), see `FittedTable`. Cells are shown literally (a path or a shape such as ``[batch, seq]``
    is never parsed as markup); pass `styled` cells for colour. ``numeric`` right-aligns all but
    the first column; key/value tables pass False."""
    return FittedTable(title, columns, rows, numeric=numeric)


def print_command(command: str, comment: str | None = None, *, indent: str = "  ") -> None:
    """A copy-paste block line: never wrapped (the terminal may soft-wrap it; pasting it runs the
    command as printed), never parsed as markup. ``comment`` goes on its own ``#`` line above."""
    if comment:
        console.print(styled(f"{indent}# {comment}", "dim"), soft_wrap=True)
    console.print(f"{indent}{command}", soft_wrap=True, markup=False, highlight=False)




def add_dtype_args(parser: argparse.ArgumentParser) -> None:
    """``--dtype`` and ``--state-dtype`` (None = the default)."""
    g = parser.add_argument_group("precision")
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="model dtype (default: the dtype the checkpoint declares in config.json, torch_dtype/dtype; fp32 when it declares none)")
    g.add_argument("--state-dtype", choices=["fp32", "fp16", "bf16"], default=None, help="SSM state dtype (default fp32)")


def add_integrity_argument(p: argparse.ArgumentParser) -> None:
    """``--check-integrity`` (inspect, generate, validate, compare, build)."""
    p.add_argument(
        "--check-integrity",
        action="store_true",
        help="hash every file of the export in full against its manifest (default: sizes, the graphs' sha256 and the "
        "weights' sampled sha256 — README: Integrity)",
    )


def check_integrity(args: argparse.Namespace, path: str | Path) -> None:
    """The full check when ``--check-integrity`` is given and ``path`` is an export (the sampled one runs anyway)."""
    if not getattr(args, "check_integrity", False):
        return
    from hybridtrt.exporter.integrity import FULL
    from hybridtrt.exporter.manifest import MANIFEST_FILE, read_manifest

    if (Path(path) / MANIFEST_FILE).is_file():
        read_manifest(path, integrity=FULL)
    else:
        from hybridtrt.exporter.manifest import TP_MANIFEST

        if (Path(path) / TP_MANIFEST).is_file():  # every rank's files
            from hybridtrt.exporter.tensor_parallel import read_tp_manifest

            read_tp_manifest(path, integrity=FULL)


def routing_summary(verification: dict) -> str:
    """One line on how MoE routing was judged in ``verification`` ('' without MoE): the artefact
    held to the truth's expert choices, and per MoE layer its own choices that differ (all graphs)."""
    from hybridtrt.judge.routing import per_layer_text

    totals: dict[str, dict[str, int]] = {}
    for graph in verification.get("graphs", {}).values():
        for layer, t in (graph.get("routing") or {}).items():
            row = totals.setdefault(layer, dict.fromkeys(("flipped", "choices", "yardstick_flipped", "allowed"), 0))
            for key in row:
                row[key] += t.get(key) or 0
    if not totals:
        return ""
    yard = bool(verification.get("yardstick"))
    per_layer = per_layer_text(totals, yard)
    truth = verification.get("truth") or "fp32 reference"
    return f"rel L2 judged with routing held to the {truth}'s expert choices; own choices differing per layer{' (yardstick)' if yard else ''} ≤ allowed: {per_layer}"
