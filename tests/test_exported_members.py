"""The public API: ``__all__`` is complete and sorted, and importing starts nothing."""

from __future__ import annotations

import subprocess
import sys
import types

import zchat_nb


def test_all_is_sorted_and_complete() -> None:
    public = {
        name
        for name, value in vars(zchat_nb).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert zchat_nb.__all__ == sorted(zchat_nb.__all__)
    assert public - {"annotations", "TYPE_CHECKING", "Any"} <= set(zchat_nb.__all__)
    for name in zchat_nb.__all__:
        assert getattr(zchat_nb, name) is not None, name


def test_import_starts_nothing() -> None:
    code = (
        "import sys, threading, zchat_nb\n"
        "assert 'IPython' not in sys.modules, 'IPython imported'\n"
        "assert 'ipywidgets' not in sys.modules, 'ipywidgets imported'\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
