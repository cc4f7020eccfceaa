"""Every ```python block of README.md runs as written: in order, in one namespace (a block
may use what an earlier one defined), each block its own exec so that a failure names the
block's line and first line. Tiny inputs, one torch thread: a few seconds."""
import re
import warnings
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str):
    """(line of the block's first code line, code) of every ```python block, in order."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```python[ \t]*\n(.*?)^```", text, re.S | re.M)]


def test_readme_python_blocks_run_in_order():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4, "README.md lost its python examples"
    namespace = {"__name__": "readme"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for line, code in blocks:
            first = next(c for c in code.splitlines() if c.strip())
            # blank lines in front keep README's line numbers in a traceback
            compiled = compile("\n" * (line - 1) + code, str(README), "exec")
            with warnings.catch_warnings():
                warnings.simplefilter("error")       # an example must not warn either
                # ... except inside the trainers' own code (their deprecations and advice
                # about data loaders are not the README's to fix)
                warnings.filterwarnings(
                    "ignore", module=r"(lightning|lightning_fabric|transformers|accelerate)\.")
                try:
                    exec(compiled, namespace)
                except Exception as e:
                    pytest.fail(f"README.md line {line}, the block starting {first!r}: "
                                f"{type(e).__name__}: {e}")
    finally:
        torch.set_num_threads(threads)


def test_python_blocks_are_found():
    text = "x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = a\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (9, "b = a\n")]
