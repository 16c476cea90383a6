"""Progress for a person at a terminal, and for a person reading a log afterwards.

``progress_bar(items, desc=..., disable=..., log=...)`` stands in for ``tqdm(...)``:

* ``disable=True``: nothing at all (``progress=False``, ``--quiet``, ranks other than 0);
* stderr is a terminal, or a Jupyter notebook draws tqdm's widgets: a tqdm bar, as before;
* anything else -- ``recon prune > log 2>&1``, a CI job, a batch system: no bar (a bar's
  redraws become hundreds of lines there), but what the bar would have ended with, as
  plain lines: one per item (``log="each"``: one per pruned layer), one when the loop
  ends (``log="end"``: a fine-tuning run), or none (``log="none"``: the per-batch bars
  nested inside a layer).

That is tqdm's own ``disable=None`` (no bar off a terminal), with the log lines added so
that a log still says how far a run got and how long each step took.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TypeVar

from tqdm.auto import tqdm

__all__ = ["LineProgress", "progress_bar"]

T = TypeVar("T")
Log = Literal["each", "end", "none"]


def _interactive(stream: Any) -> bool:
    """True where a redrawn bar is what a reader sees: a terminal, or a notebook's widget."""
    notebook = sys.modules.get("tqdm.notebook")
    if notebook is not None and issubclass(tqdm, notebook.tqdm_notebook):
        return True
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False


class LineProgress:
    """The plain-line stand-in for a tqdm bar (the subset of its interface recon uses).

    Iterating yields the items; after each item is done (``log="each"``) or after the
    last (``log="end"``) one line goes to ``file`` (``sys.stderr`` when None, looked up
    at write time), for example::

        recon 3/10 layers: features.7 64->32 (1.4 s, 5.2 s in all)
        fine-tuning: 200 steps, loss=0.3121 (12.5 s)
    """

    def __init__(
        self,
        iterable: Iterable[T],
        *,
        desc: str = "",
        unit: str = "it",
        log: Log = "each",
        total: int | None = None,
        file: Any = None,
    ) -> None:
        if log not in ("each", "end", "none"):
            raise ValueError(f"The 'log' argument must be 'each', 'end' or 'none'. Got {log!r}.")
        self.iterable = iterable
        self.desc = desc.strip()
        self.unit = unit
        self.log = log
        if total is None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total = total
        self.file = file
        self.n = 0
        self.postfix = ""

    # -- the tqdm interface recon uses

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        pass

    def write(self, s: str, file: Any = None, end: str = "\n") -> None:
        """A line of the caller's, between progress lines (as ``tqdm.write``)."""
        stream = file if file is not None else self.file if self.file is not None else sys.stderr
        print(s, file=stream, end=end, flush=True)

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("this progress has no length")
        return self.total

    def __iter__(self) -> Iterator[T]:
        start = last = time.perf_counter()
        for item in self.iterable:
            yield item  # the caller's work on ``item`` runs before we resume
            self.n += 1
            now = time.perf_counter()
            if self.log == "each":
                self._write(self._each_line(now - last, now - start))
            last = now
        if self.log == "end":
            self._write(self._end_line(time.perf_counter() - start))

    # -- lines

    def _count(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        plural = "" if self.unit.endswith("s") or (self.total or self.n) == 1 else "s"
        return f"{self.n}{of} {self.unit}{plural}"

    def _each_line(self, seconds: float, in_all: float) -> str:
        what = f": {self.postfix}" if self.postfix else ""
        return f"{self.desc} {self._count()}{what} ({seconds:.1f} s, {in_all:.1f} s in all)"

    def _end_line(self, seconds: float) -> str:
        what = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {self._count()}{what} ({seconds:.1f} s)"

    def _write(self, line: str) -> None:
        stream = self.file if self.file is not None else sys.stderr
        print(line, file=stream, flush=True)


def progress_bar(
    iterable: Iterable[T],
    *,
    desc: str = "",
    disable: bool = False,
    leave: bool = True,
    unit: str = "it",
    log: Log = "each",
    total: int | None = None,
    file: Any = None,
) -> Any:
    """A tqdm bar at a terminal, plain log lines elsewhere, nothing when ``disable``.

    Parameters
    ----------
    iterable : iterable
        What to loop over.
    desc, leave, unit, total :
        As for ``tqdm``.
    disable : bool, default False
        Show nothing at all.
    log : {"each", "end", "none"}, default "each"
        Off a terminal: a line after each item, one line at the end, or nothing.
    file : stream, optional
        Where to write; ``sys.stderr`` (at the time of writing) when None.

    Returns
    -------
    An iterable with ``set_postfix_str``, ``set_postfix`` and ``close``: a ``tqdm`` bar or
    a :class:`LineProgress`.
    """
    if log not in ("each", "end", "none"):
        raise ValueError(f"The 'log' argument must be 'each', 'end' or 'none'. Got {log!r}.")
    if disable:
        log = "none"
    elif _interactive(file if file is not None else sys.stderr):
        return tqdm(iterable, desc=desc, leave=leave, unit=unit, total=total, file=file)
    return LineProgress(iterable, desc=desc, unit=unit, log=log, total=total, file=file)
