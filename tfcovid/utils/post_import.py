"""Run a function right after a module is first imported, without importing it (a one-shot
``sys.meta_path`` finder). ``tfcovid.api`` uses it to register tfcovid's Keras classes as soon
as Keras loads, so that ``import tfcovid`` itself never loads Keras.

May import: the standard library only.
"""
from __future__ import annotations

import importlib.abc
import sys
import warnings
from typing import Callable


class PostImportHook(importlib.abc.MetaPathFinder):
    """A one-shot finder: right after the module ``name`` has executed, it removes itself and calls
    ``callback``, whose exceptions become a RuntimeWarning: the import itself always goes on.

    Finding the module (``importlib.util.find_spec``, as TensorFlow does for keras) runs nothing.
    """

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None  # a namespace package or a legacy loader: leave it alone
        spec.loader = _CallbackLoader(spec.loader, self)
        return spec

    def done(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            self.callback()
        except Exception as err:
            warnings.warn(f"After importing {self.name}: {type(err).__name__}: {err}", RuntimeWarning,
                          stacklevel=2)


class _CallbackLoader(importlib.abc.Loader):
    """Wraps the module's own loader: runs it, then the hook. The module keeps its own loader."""

    def __init__(self, loader, hook: PostImportHook):
        self.loader, self.hook = loader, hook

    def __getattr__(self, name):  # get_code, is_package, get_resource_reader, ...
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)  # if this raises, the error is the module's and the hook stays
        self.hook.done()


def install(name: str, callback: Callable[[], None]) -> bool:
    """Call ``callback`` once, right after ``name`` is first imported; False (and nothing done)
    when a hook for ``name`` is already installed. The caller checks ``sys.modules`` first."""
    if any(isinstance(f, PostImportHook) and f.name == name for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, PostImportHook(name, callback))
    return True
