"""Shared CLI pieces: the console, step progress, tables and argument groups."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

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


def table(title: str, columns: list[str], rows: list[list[object]], *, numeric: bool = True) -> Table:
    """A rich table with the given columns. Cells are shown literally (a path or a shape such as
    ``[batch, seq]`` is never parsed as markup); pass `styled` cells for colour. ``numeric``
    right-aligns all but the first column; key/value tables pass False. The first column (the key:
    an op, a tensor name) is never wrapped or cut; on a narrow terminal the others wrap, never end
    in an ellipsis."""
    t = Table(title=Text(title), title_justify="left", show_header=any(columns))
    for i, c in enumerate(columns):
        t.add_column(Text(c), justify="right" if numeric and i > 0 else "left", no_wrap=i == 0, overflow="fold")
    for r in rows:
        t.add_row(*[x if isinstance(x, Text) else Text(str(x)) for x in r])
    return t


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def add_dtype_args(parser: argparse.ArgumentParser) -> None:
    """``--dtype`` and ``--state-dtype`` (None = the default)."""
    g = parser.add_argument_group("precision")
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="model dtype (default: the dtype the checkpoint declares in config.json, torch_dtype/dtype; fp32 when it declares none)")
    g.add_argument("--state-dtype", choices=["fp32", "fp16", "bf16"], default=None, help="SSM state dtype (default fp32)")
