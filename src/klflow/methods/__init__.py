"""Generative methods behind one protocol (see base.Method).

Every module in this package registers its method(s) with `@register(name)` when imported; all
are imported here, so adding a method is adding a file. KL-flow's lives in its own package
(klflow.flow.method) and is imported here too.
"""

import importlib
import pkgutil

from klflow.methods.base import (
    Method,
    SpecialTokens,
    build_method,
    check_sample_options,
    generate_defaults,
    method_names,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
importlib.import_module("klflow.flow.method")

__all__ = ["Method", "SpecialTokens", "build_method", "check_sample_options", "generate_defaults", "method_names", "register"]
