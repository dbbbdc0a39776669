"""Packet handlers: :class:`~golconde.handlers.base.Handler` and loading by dotted path."""
from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from typing import Dict, Iterable, Optional, Tuple, Type

from ..errors import ConfigError
from .base import Handler

LOGGER = logging.getLogger(__name__)

__all__ = ["Handler", "commit_refresh", "handler_module", "load_handler", "refresh_modules"]

#: module name -> its source file's modification time (ns) when load_handler imported it
_LOADED: Dict[str, Optional[int]] = {}


def _split(path: str) -> Tuple[str, str]:
    """``(module, attribute)`` of a handler path ``package.module.Class`` or
    ``package.module:Class`` (either may be empty when the path is malformed)."""
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    return module_name, attribute


def handler_module(function_name: str) -> Optional[str]:
    """The module of a custom handler's dotted path; ``None`` for AutoSQL or a malformed path."""
    if not isinstance(function_name, str):
        return None
    path = function_name.strip()
    if not path or path.lower() == "autosql":
        return None
    return _split(path)[0] or None


def _mtime(module_name: str) -> Optional[int]:
    source = getattr(sys.modules.get(module_name), "__file__", None)
    try:
        return os.stat(source).st_mtime_ns if source else None
    except OSError:
        return None


def refresh_modules(function_names: Iterable[str]) -> Dict[str, Optional[int]]:
    """Import again the custom handlers' modules among ``function_names`` whose source file
    changed since :func:`load_handler` imported them (``importlib.reload``), so that a reload
    (SIGHUP) runs the code on disk, and finds a class added there since. Only the handler's own
    module: modules it imports are not imported again. Listeners built before keep the classes
    they have.

    :returns: the modules imported again, with their files' times, for :func:`commit_refresh`
        once the reload is accepted: until then they count as changed (a reload refused after
        this, for another reason, must not leave the running listeners on the old code for good).
    :raises ConfigError: a module failed to import again (it stays as it was).
    """
    refreshed: Dict[str, Optional[int]] = {}
    for module_name in dict.fromkeys(filter(None, map(handler_module, function_names))):
        if module_name not in _LOADED or module_name not in sys.modules:
            continue
        now = _mtime(module_name)
        if now is None or now == _LOADED[module_name]:
            continue
        try:
            importlib.reload(sys.modules[module_name])
        except (Exception, SystemExit) as exc:     # its code failed: as load_handler says it
            raise ConfigError("handler module %s changed and failed to import again: %s: %s"
                              % (module_name, type(exc).__name__, exc)) from exc
        refreshed[module_name] = now
        LOGGER.info("handler module %s changed on disk: imported again", module_name)
    return refreshed


def commit_refresh(refreshed: Dict[str, Optional[int]]) -> None:
    """Record the modules :func:`refresh_modules` imported again as up to date (the reload that
    did it was accepted)."""
    _LOADED.update(refreshed)


def _check_apply(path: str, cls: Type[Handler]) -> None:
    """Refuse a handler class that could apply nothing: no ``apply`` of its own (the base's
    raises NotImplementedError for every packet), or one that cannot be called as
    ``apply(cursor, packet)`` (every packet dead-lettered with a TypeError).

    :raises ConfigError: naming the path and what is wrong."""
    if cls.apply is Handler.apply:
        raise ConfigError("function_name %r: %s defines no apply(cursor, packet) method"
                          % (path, cls.__name__))
    # a staticmethod or a classmethod takes (cursor, packet) once looked up; a function, self too
    bound = isinstance(inspect.getattr_static(cls, "apply"), (staticmethod, classmethod))
    try:
        inspect.signature(cls.apply).bind(*(None,) * (2 if bound else 3))
    except TypeError as exc:
        raise ConfigError("function_name %r: %s.apply cannot be called as apply(self, cursor,"
                          " packet): %s" % (path, cls.__name__, exc)) from None
    except ValueError:      # no signature to read (a builtin): let it be tried
        pass


def load_handler(function_name: str) -> Type[Handler]:
    """The handler class named by a configuration's ``function_name``.

    ``AutoSQL`` (any case) is :class:`golconde.handlers.autosql.AutoSQL`; anything else is a path
    ``package.module.Class`` or ``package.module:Class`` to a subclass of
    :class:`~golconde.handlers.base.Handler` (after gmr/rejected's ``import_consumer``).

    :raises ConfigError: naming the path and the reason: malformed path, module not found or failing
        to import, attribute missing, or an object that is not a Handler subclass (a plain function,
        as Golconde 0.6 allowed, is refused).
    """
    if not isinstance(function_name, str) or not function_name.strip():
        raise ConfigError("function_name: expected AutoSQL or a dotted path package.module.Class, not %r"
                          % (function_name,))
    path = function_name.strip()
    if path.lower() == "autosql":
        from .autosql import AutoSQL
        return AutoSQL
    module_name, attribute = _split(path)
    if not module_name or not attribute or any(not part for part in module_name.split(".") + attribute.split(".")):
        raise ConfigError("function_name %r: expected AutoSQL or a dotted path package.module.Class" % path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            reason = "module %s not found" % module_name
        else:
            reason = "importing module %s failed: %s" % (module_name, exc)
        raise ConfigError("function_name %r: %s" % (path, reason)) from exc
    except (Exception, SystemExit) as exc:  # the module's own code failed (sys.exit too)
        reason = "importing module %s failed: %s: %s" % (module_name, type(exc).__name__, exc)
        LOGGER.error("cannot load handler %s: %s", path, reason, exc_info=True)
        raise ConfigError("function_name %r: %s" % (path, reason)) from exc
    _LOADED.setdefault(module_name, _mtime(module_name))
    obj = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError("function_name %r: module %s has no attribute %s"
                              % (path, module_name, attribute)) from None
    if inspect.isclass(obj) and issubclass(obj, Handler) and obj is not Handler:
        _check_apply(path, obj)
        return obj
    if inspect.isclass(obj):
        reason = "class %s is not a subclass of golconde.handlers.base.Handler" % attribute
        if obj is Handler:
            reason = "Handler is the abstract base class; name a subclass of it"
    elif callable(obj):
        reason = ("%s is a %s, not a class; handlers are subclasses of golconde.handlers.base.Handler"
                  " implementing apply(cursor, packet) (plain functions, as in Golconde 0.6, are not"
                  " supported)" % (attribute, type(obj).__name__))
    else:
        reason = "%s is a %s, not a subclass of golconde.handlers.base.Handler" % (attribute, type(obj).__name__)
    raise ConfigError("function_name %r: %s" % (path, reason))
