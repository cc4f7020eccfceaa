"""Progress reporting: one bar per nesting level on a terminal, plain lines otherwise.

On a terminal (stderr is a TTY) ``progress(...)`` is a tqdm bar; a bar opened while another
is open is drawn below it and removed when done (``leave=False``), so there is one bar per
level. When stderr is not a terminal (a log file, CI, a pipe) no escape codes are written:
the outermost level prints a closing line (``label: 36 runs in 40.2 s``), for the run
loop one line per finished run (``runs 3/36: kalman 4-shot seed 0 (1.2 s)``), and for a long
loop without such lines (the stand-in's pretraining, the feature build) a line every
``every`` seconds (``stand-in pretraining 212/800: loss=1.234 (25 s so far)``), so that a
log shows the job is alive; inner levels print nothing.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Optional

_depth = 0


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Plain:
    """The non-terminal stand-in for a tqdm bar (same methods, plain lines)."""

    def __init__(self, iterable, total, desc, unit, lines: bool, item_lines: bool,
                 every: float = 5.0):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__")
                                                      else None)
        self.desc, self.unit, self.lines, self.item_lines = desc, unit, lines, item_lines
        self.n = 0
        self.postfix = ""
        self.t0 = self.t_item = self.t_line = time.time()
        self.every = every
        self.closed = False

    def __iter__(self):
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def update(self, n=1):
        self.n += n
        if not self.lines:
            return
        now = time.time()
        tot = f"/{self.total}" if self.total else ""
        extra = f": {self.postfix}" if self.postfix else ""
        if self.item_lines:
            print(f"{self.desc} {self.n}{tot}{extra} ({now - self.t_item:.1f} s)",
                  file=sys.stderr, flush=True)
            self.t_item = self.t_line = now
        elif self.every and now - self.t_line >= self.every:
            print(f"{self.desc} {self.n}{tot}{extra} ({now - self.t0:.0f} s so far)",
                  file=sys.stderr, flush=True)
            self.t_line = now

    def set_postfix(self, **kw):
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def set_postfix_str(self, s):
        self.postfix = s

    def close(self):
        global _depth
        if self.closed:
            return
        self.closed = True
        _depth -= 1
        if self.lines:
            print(f"{self.desc}: {self.n} {self.unit}{'s' if self.n != 1 else ''} in "
                  f"{time.time() - self.t0:.1f} s", file=sys.stderr, flush=True)


class _Bar:
    def __init__(self, bar):
        self.bar = bar

    def __iter__(self):
        global _depth
        try:
            yield from self.bar
        finally:
            self.close()

    def __getattr__(self, name):
        return getattr(self.bar, name)

    def close(self):
        global _depth
        if not getattr(self, "_closed", False):
            self._closed = True
            _depth -= 1
            self.bar.close()


class _Off:
    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
             unit: str = "it", enabled: bool = True, item_lines: bool = False,
             every: float = 5.0):
    """A progress bar (terminal) or plain lines (otherwise) over ``iterable``; see the
    module docstring. ``enabled=False`` (``--quiet``) shows nothing. ``item_lines``: off a
    terminal, print a line per finished item; otherwise a line at most every ``every``
    seconds (0: only the closing line)."""
    global _depth
    if not enabled:
        return _Off(iterable)
    level = _depth
    _depth += 1
    if _is_tty():
        from tqdm.auto import tqdm
        return _Bar(tqdm(iterable, total=total, desc=desc, unit=unit, leave=level == 0,
                         dynamic_ncols=True))
    return _Plain(iterable, total, desc, unit, lines=level == 0, item_lines=item_lines,
                  every=every)
