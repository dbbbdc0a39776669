"""golconded's core: builds the listeners from the configuration, owns signals, stops in bounded time.

Signals only set flags; the main loop acts (gmr/helper's controller, rq's request_stop):
SIGTERM/SIGINT stop gracefully (each listener finishes or releases its in-flight batch), a second
one forces the exit; SIGHUP reloads the configuration: listeners whose configuration changed are
restarted, new ones started, removed ones stopped; a configuration that does not validate is
refused and the running one kept.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Collection, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from . import config as config_module
from . import handlers
from .destination import ClientDestination, TriggerDestination
from .errors import ConfigError, describe
from .feeds import FeedGraph
from .listener import Listener, QueueConsumer
from .stats import Registry
from .schema import parse_relation
from .target import TargetListener

LOGGER = logging.getLogger(__name__)


def discard_listeners(listeners: Iterable[Listener]) -> None:
    """:meth:`Listener.discard` each of ``listeners``, never started (a failure is logged)."""
    for listener in listeners:
        try:
            listener.discard()
        except (Exception, SystemExit) as exc:   # noqa: BLE001 - a handler's shutdown: never fatal
            LOGGER.warning("[%s] discarding a listener built for a check: %s", listener.name,
                           describe(exc))


def build_listeners(config: Any, registry: Registry,
                    only: Optional[Collection[str]] = None,
                    feeds: Optional[FeedGraph] = None) -> Dict[str, Listener]:
    """One listener per target and per destination, keyed by thread name (``Dest``,
    ``Dest_target``); with ``only``, just the listeners of those names (one configuration
    spread over several processes). Handlers are imported here, so a bad ``function_name``
    raises :class:`~golconde.errors.ConfigError` before anything connects.

    :param feeds: what the daemon's targets feed (:mod:`golconde.feeds`), shared by the
        listeners it runs (default: each listener keeps a graph of its own).
    :raises ConfigError: every listener's problem (a handler that cannot be loaded or refuses its
        settings), one line each under its key path; also when ``only`` names a listener the
        configuration does not have.
    """
    names = [name for destination in config.destinations
             for name in [t.thread_name for t in destination.targets] + [destination.thread_name]]
    if only is not None:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ConfigError("--only: %s %s not a listener of this configuration (listeners: %s)"
                              % (", ".join(unknown), "is" if len(unknown) == 1 else "are",
                                 ", ".join(names)))
    wanted = set(names if only is None else only)
    listeners: Dict[str, Listener] = {}
    problems: List[str] = []

    def build(name: str, path: str, make: Callable[[], Listener]) -> None:
        try:
            listeners[name] = make()
        except ConfigError as exc:      # every listener's problem, each under its key path
            problems.extend("%s: %s" % (path, line) for line in str(exc).splitlines())

    for destination in config.destinations:
        path = "Destinations.%s" % destination.name
        for target in destination.targets:
            if target.thread_name in wanted:
                stats = registry.thread(target.thread_name, "target", destination.name)
                build(target.thread_name, "%s.Targets.%s" % (path, target.name),
                      functools.partial(TargetListener, target, stats))
        if destination.thread_name not in wanted:
            continue
        stats = registry.thread(destination.thread_name, "destination", destination.name)
        kind = TriggerDestination if destination.mode == "trigger" else ClientDestination
        build(destination.thread_name, path, functools.partial(kind, destination, stats))
    if problems:
        discard_listeners(listeners.values())
        raise ConfigError("\n".join(problems))
    share_consumed_queues(listeners.values(), config)
    if feeds is not None:
        for listener in listeners.values():
            listener.feeds = feeds
    return listeners


def share_consumed_queues(listeners: Iterable[Listener], config: Any) -> None:
    """Tell each client-flow destination every queue ``config`` consumes, where it must not send
    a reply (:meth:`ClientDestination.send_replies`)."""
    queues = config_module.consumed_queues(config)
    for listener in listeners:
        if isinstance(listener, ClientDestination):
            listener.consumed_queues = queues


def _queues_of(listener: QueueConsumer) -> List[str]:
    """The queues a queue consumer was to consume: those it was still to empty first
    (:attr:`QueueConsumer.previous_queues`), then its own; each once."""
    return list(dict.fromkeys(list(listener.previous_queues) + [listener.config.queue]))


def _carry_queues(name: str, previous: Optional[Listener], listener: Listener, log: bool = True) -> None:
    """A reload that changed the ``queue`` of a queue consumer: its replacement consumes what
    waits on the old queue first (:attr:`QueueConsumer.previous_queues`; those its predecessor
    had not emptied yet too), when it is on the same broker. On another broker, the old queue's
    packets are not consumed: logged as an error. ``log=False``: for a stand-in that does not
    start (:meth:`Daemon.reload`), only that error is logged."""
    if not (isinstance(previous, QueueConsumer) and isinstance(listener, QueueConsumer)):
        return
    queues = [queue for queue in _queues_of(previous) if queue != listener.config.queue]
    if not queues:
        return
    where = [(b.host, b.port, b.vhost) for b in (previous.config.stomp, listener.config.stomp)]
    if where[0] != where[1]:
        LOGGER.error("[%s] its queue moved from %s on %s:%d to %s on %s:%d: packets still waiting"
                     " on %s there are not consumed (drain it first, or move them)", name,
                     ", ".join(queues), previous.config.stomp.host, previous.config.stomp.port,
                     listener.config.queue, listener.config.stomp.host, listener.config.stomp.port,
                     ", ".join(queues))
        return
    listener.previous_queues = queues
    if not log:
        return
    LOGGER.warning("[%s] its queue changed from %s to %s: it consumes what waits on %s first"
                   " (a restart would not)", name, ", ".join(queues), listener.config.queue,
                   ", ".join(queues))


def _renamed_targets(old: Dict[str, Listener], candidates: Dict[str, Any]) -> Dict[str, Listener]:
    """Targets a reload renamed: ``{new name: old listener}`` for each new target of a destination
    (among ``candidates``, the listeners the reload built to check its configuration) that lost
    exactly one target writing the same database (``pgsql``) and relation, where that
    destination gained exactly one such target. Its replacement consumes the old queue first
    (:func:`_carry_queues`): renaming a target and its queue together, as the example names
    them, lost the packets fanned out to the old queue before the reload."""
    def key(listener: Any) -> Tuple[str, str, Any]:
        try:
            relation: Any = parse_relation(listener.config.target)
        except Exception:      # an unparsable relation is refused at load; compared as written
            relation = listener.config.target
        return (listener.config.destination, listener.config.pgsql, relation)

    gone: Dict[Tuple[str, str, Any], List[Listener]] = {}
    for name, listener in old.items():
        if name not in candidates and isinstance(listener, TargetListener):
            gone.setdefault(key(listener), []).append(listener)
    added: Dict[Tuple[str, str, Any], List[str]] = {}
    for name, listener in candidates.items():
        if name not in old and isinstance(listener, TargetListener):
            added.setdefault(key(listener), []).append(name)
    renamed = {}
    for where, names in added.items():
        if len(names) == 1 and len(gone.get(where, ())) == 1:
            previous = gone[where][0]
            renamed[names[0]] = previous
            # (a stuck listener renamed back to its own name is that consumer again)
            ledger_note = "" if previous.name == names[0] else (
                "; the ledger rows of %s (golconde.applied) are no longer pruned: once its queue"
                " is empty, golconde ledger prune --consumer %s" % (previous.name, previous.name))
            LOGGER.warning("[%s] takes the place of removed target %s (the same database and"
                           " relation)%s", names[0], previous.name, ledger_note)
    return renamed


def _start(listener: Listener) -> None:
    """Start a listener a reload built; its statistics (shared by name) may hold the problem
    ``replacing`` of a replacement an earlier reload left waiting, or ``not-built`` of an earlier
    reload that could not build it: cleared."""
    listener.stats.set_problem("replacing", None)
    listener.stats.set_problem("not-built", None)
    listener.start()


class Daemon:
    """Runs every listener of a configuration, plus the HTTP stats server.

    :param config: a validated :class:`golconde.config.Config`.
    :param config_path: the file to re-read on SIGHUP (``None``: reload disabled).
    :param stop_timeout: seconds allowed for all listeners to stop.
    :param only: run just the listeners of these thread names (``golconded --only``); kept
        across reloads.
    :param http_port: the stats server's port instead of ``HTTPServer.port`` (``--http-port``:
        one port per process when a configuration is spread over several); kept across reloads.
    :raises ConfigError: a handler cannot be loaded, or ``only`` names an unknown listener.
    """

    def __init__(self, config: Any, config_path: Optional[str] = None,
                 stop_timeout: float = 5.0, only: Optional[Collection[str]] = None,
                 http_port: Optional[int] = None) -> None:
        self.config = config
        self.http_port = http_port
        self.config_path = config_path
        self.stop_timeout = stop_timeout
        self.only = None if only is None else frozenset(only)
        self.registry = Registry()
        #: this daemon's trigger-mode destinations and what its targets feed (cycles)
        self.feeds = FeedGraph()
        self.listeners: Dict[str, Listener] = build_listeners(config, self.registry, self.only,
                                                              self.feeds)
        #: guards :attr:`listeners` and :attr:`_waiting` against the threads that start a
        #: replacement once the listener it replaces has stopped
        self._lock = threading.RLock()
        #: thread name -> (listener still stopping, its replacement not started yet)
        self._waiting: Dict[str, Tuple[Listener, Listener]] = {}
        #: the stopping listeners a thread waits for (one thread each, whatever the reloads)
        self._watched: Set[Listener] = set()
        self._stopped = False
        self.http: Any = None
        #: called with the new ``Logging`` section when a reload changes it (set by golconded's
        #: command line, which configured logging; may raise, e.g. OSError on a log file)
        self.on_logging_change: Optional[Callable[[Any], None]] = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._signals = 0

    # -- control -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the HTTP server (if enabled) and every listener."""
        self._start_http()
        for listener in self.listeners.values():
            listener.start()
        LOGGER.info("golconded started: %d listener threads", len(self.listeners))

    def _start_http(self) -> None:
        http_config = self.config.http
        if not http_config.enabled:
            return
        from .httpd import StatsServer
        port = http_config.port if self.http_port is None else self.http_port
        self.http = StatsServer(self.registry, host=http_config.listen, port=port,
                                public_config=self.config.public_view(),
                                max_backlog=http_config.health.max_backlog,
                                max_lag=http_config.health.max_lag)
        try:
            self.http.start()
            self._serve_config(self.http)       # its actual address (a port given as 0...)
            LOGGER.info("stats server on http://%s:%d/", http_config.listen, self.http.port)
        except OSError as exc:
            LOGGER.error("stats server cannot listen on %s:%d: %s (continuing without it)",
                         http_config.listen, port, exc)
            self.http = None

    def _restart_http(self) -> None:
        """Serve the (reloaded) configuration: on another port, a new stats server started before
        the old one stops, so that when it cannot listen (the port taken) the old one keeps
        serving, with a logged error; on the same port (the listen address may differ, and
        overlap), the old one stopped first, and started again should the new one fail."""
        running, http_config = self.http, self.config.http
        port = http_config.port if self.http_port is None else self.http_port
        if running is None or not http_config.enabled:
            self._stop_http()
            self._start_http()
            return
        if (running.host, running.port) == (http_config.listen, port):
            # the same address: the new configuration and thresholds served by the same socket,
            # so that no request is refused during a reload
            self._serve_config(running)
            return
        self.http = None
        if port == running.port:
            # the same port (another listen address may overlap the old one): stopped first,
            # started again where it was should the new address fail
            running.stop()
            self._start_http()
            if self.http is None:
                try:
                    running.start()
                    self.http = running
                except OSError as exc:
                    LOGGER.error("the stats server could not listen again on %s:%d: %s",
                                 running.host, running.port, exc)
        else:
            self._start_http()
            if self.http is None:
                self.http = running
            else:
                running.stop()
        if self.http is running:
            self._serve_config(running)     # where it was, but the reloaded configuration
            LOGGER.error("the stats server stays on http://%s:%d/ (the reloaded HTTPServer"
                         " address could not be used)", running.host, running.port)

    def _serve_config(self, server: Any) -> None:
        """Have the running stats server serve this configuration's /config and thresholds,
        with the address it listens on (a reload whose new address could not be used leaves it
        on the old one: /config showed the new port)."""
        health = self.config.http.health
        view = self.config.public_view()
        view["HTTPServer"].update(listen=server.host, port=server.port)
        server.update(view, health.max_backlog, health.max_lag)

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def stop(self) -> bool:
        """Stop every listener, waiting at most ``stop_timeout`` seconds in all (a replacement
        still waiting for the listener it replaces is not started). Returns True when all
        stopped in time."""
        with self._lock:
            self._stopped = True
            waiting, self._waiting = self._waiting, {}
            listeners = list(self.listeners.values())
        discard_listeners([replacement for _, replacement in waiting.values()])  # never started
        return self._stop_listeners(listeners) and self._stop_http()

    def _stop_http(self) -> bool:
        if self.http is not None:
            self.http.stop()
            self.http = None
        return True

    def _stop_listeners(self, listeners: list) -> bool:
        for listener in listeners:
            listener.stop()
        deadline = time.monotonic() + self.stop_timeout
        all_stopped = True
        for listener in listeners:
            if listener.is_alive():
                listener.join(max(0.0, deadline - time.monotonic()))
            if listener.is_alive():
                all_stopped = False
                LOGGER.error("[%s] did not stop within %.1fs", listener.name, self.stop_timeout)
        return all_stopped

    def reload(self) -> bool:
        """Re-read ``config_path`` and apply the difference. Returns False (and keeps running the
        old configuration) when the new one is invalid or cannot be read for any other reason
        (logged); False too when, the configuration accepted, a listener it stopped could not be
        built again (it stays listed, stopped, the others started: logged)."""
        if not self.config_path:
            LOGGER.warning("reload requested but no configuration file is known")
            return False
        try:
            new_config = config_module.load(self.config_path)
            # handler code changed on disk: imported again, and its listeners restarted
            refreshed = handlers.refresh_modules(
                [d.function_name for d in new_config.destinations]
                + [t.function_name for d in new_config.destinations for t in d.targets])
            candidates = build_listeners(new_config, Registry(), self.only)
        except ConfigError as exc:
            LOGGER.error("reload refused, keeping the running configuration: %s", exc)
            return False
        except (Exception, SystemExit):   # a defect, not the file's fault: never the daemon's end
            LOGGER.exception("reload failed, keeping the running configuration")
            return False
        discard_listeners(candidates.values())   # built to check and compare the configuration: none starts
        handlers.commit_refresh(refreshed)       # accepted: those modules are up to date
        with self._lock:
            # replacements still waiting for a stuck listener are this reload's to decide again,
            # with listeners it builds: they never start (their waiter reads _waiting)
            superseded, self._waiting = self._waiting, {}
            old = dict(self.listeners)
        discard_listeners([replacement for _, replacement in superseded.values()])
        stopping = [listener for name, listener in old.items()
                    if name not in candidates or candidates[name].config != listener.config
                    or handlers.handler_module(getattr(listener.config, "function_name", "")) in refreshed
                    or not listener.is_alive()      # a listener that stopped is restarted
                    or listener.stopping]           # one told to stop (stuck) is not kept
        # one told to stop by an earlier reload and still stuck is not waited for again (every
        # SIGHUP, logrotate's say, would hold the main loop stop_timeout seconds)
        still = [listener for listener in stopping if listener.stopping and listener.is_alive()]
        for listener in still:
            LOGGER.warning("[%s] still stopping (stuck since an earlier reload)", listener.name)
        self._stop_listeners([listener for listener in stopping if listener not in still])
        kept = {name: listener for name, listener in old.items() if listener not in stopping}
        # those of listeners an earlier reload could not build too (whose stand-in, if any, is
        # in self.listeners under that name, with a throwaway registry's statistics)
        for name in dict.fromkeys(list(old) + self.registry.names()):
            current = self.registry.get(name)
            if name not in candidates or (current is not None and (
                    current.role, current.destination) != (candidates[name].stats.role,
                                                            candidates[name].stats.destination)):
                self.registry.remove(name)  # gone, or the name now has another role: new counters
        # only those to start (a listener built and dropped kept its handler's resources)
        wanted = [name for name in candidates if name not in kept]
        fresh, failed = self._build_again(new_config, wanted)
        renamed = _renamed_targets(old, candidates)
        for name in failed:     # listed, stopped (/health fails), until a reload builds it
            previous = old.get(name) or renamed.get(name)
            if previous is not None and previous.is_alive():
                # stuck (it did not stop in time): listed under its own name until it stops;
                # the next reload waits for it, as for a listener it replaces
                kept[previous.name] = previous
                continue
            # the listener built for the check stands in, never started, so that the next
            # reload finds its queue (the one its destination fans out to now) and those it was
            # to empty first (its predecessor's), to consume them or to warn of them
            stand_in = candidates[name]
            _carry_queues(name, previous, stand_in, log=False)
            kept[name] = stand_in
        for name, listener in fresh.items():
            _carry_queues(name, old.get(name, renamed.get(name)), listener)
        for name, listener in old.items():
            if (name not in candidates and isinstance(listener, TargetListener)
                    and listener not in renamed.values()):
                queues = _queues_of(listener)
                one = len(queues) == 1
                LOGGER.warning("[%s] target removed: its queue%s %s %s no longer consumed, and may"
                               " hold packets fanned out before the reload; purge %s before the"
                               " target is added again (they would be applied first); its ledger"
                               " rows are no longer pruned: golconde ledger prune --consumer %s",
                               name, "" if one else "s", ", ".join(queues),
                               "is" if one else "are", "it" if one else "them", listener.name)
            elif name not in candidates and isinstance(listener, ClientDestination):
                LOGGER.warning("[%s] destination removed: its ledger rows in its canonical"
                               " database are no longer pruned: golconde ledger prune --consumer"
                               " %s", name, listener.name)
        started = 0
        with self._lock:
            if self._stopped:       # stop() from another thread meanwhile: nothing more starts
                discard_listeners(fresh.values())
                return False
            for name, listener in fresh.items():
                if name in kept:
                    continue
                # a renamed target's predecessor too: it holds the lock of the queue its
                # replacement must empty first (started beside it, it left that queue for good)
                previous = old.get(name) or renamed.get(name)
                if previous is not None and previous.is_alive():
                    # it did not stop in time (stuck on a lock, say): two consumers of one queue
                    # could apply its packets out of order, and its end would mark the
                    # replacement's statistics stopped; it stays listed until it has stopped
                    kept[name] = previous
                    self._start_when_stopped(name, previous, listener)
                    if previous.name != name:
                        # the predecessor's statistics went with its name: say why this waits
                        listener.stats.set_problem("replacing", "starts once %s, the target it"
                                                   " replaces, has stopped (stuck: its packets"
                                                   " wait)" % previous.name)
                        LOGGER.warning("[%s] starts once %s, which it replaces, has stopped",
                                       name, previous.name)
                    else:
                        LOGGER.warning("[%s] its replacement starts once it has stopped", name)
                    continue
                kept[name] = listener
                _start(listener)
                started += 1
            self.listeners = kept
            share_consumed_queues(kept.values(), new_config)
        if new_config.logging != self.config.logging:
            if self.on_logging_change is None:
                LOGGER.warning("the Logging section changed: it applies at the next start")
            else:
                try:
                    self.on_logging_change(new_config.logging)
                    LOGGER.info("logging set up again from the new Logging section")
                except Exception as exc:   # the old logging stays as it was
                    LOGGER.error("the new Logging section could not be applied (%s): logging"
                                 " goes on as before", exc)
        self.config = new_config
        self._restart_http()            # its /config page shows the configuration
        if failed:
            LOGGER.error("configuration reloaded in part: %d listeners stopped, %d started, %s not"
                         " built", len(stopping) - len(still), started, ", ".join(failed))
            return False
        LOGGER.info("configuration reloaded: %d listeners stopped, %d started",
                    len(stopping) - len(still), started)
        return True

    def _build_again(self, config: Any, wanted: Sequence[str]) -> Tuple[Dict[str, Listener], List[str]]:
        """The listeners ``wanted`` of a reload's accepted ``config`` (built once already, for
        the check), and the names of those that failed this time (a handler whose ``__init__``
        fails now and then): those are logged, the others built one by one so that they start.

        :returns: ``({name: listener}, [names that could not be built])``."""
        if not wanted:
            return {}, []
        try:
            return build_listeners(config, self.registry, wanted, self.feeds), []
        except (Exception, SystemExit) as exc:
            LOGGER.warning("reload: the listeners to start could not all be built again after the"
                           " check (%s): built one by one", describe(exc))
        fresh: Dict[str, Listener] = {}
        failed = []
        for name in wanted:
            try:
                fresh.update(build_listeners(config, self.registry, [name], self.feeds))
            except (Exception, SystemExit) as exc:
                LOGGER.exception("[%s] could not be built again after the reload's check: it stays"
                                 " stopped until the next reload (SIGHUP)", name)
                failed.append(name)
                stats = self.registry.get(name)
                if stats is not None:
                    stats.set_problem("not-built", "the last reload could not build it (%s): it"
                                      " runs after a reload (SIGHUP) that can" % describe(exc))
        return fresh, failed

    def _start_when_stopped(self, name: str, previous: Listener, replacement: Listener) -> None:
        """Start ``replacement`` once ``previous`` has stopped, unless the daemon stopped or a
        later reload decided otherwise meanwhile; called with :attr:`_lock` held. One thread
        waits for each stopping listener, whatever the reloads meanwhile: when it has stopped,
        the thread starts the replacements :attr:`_waiting` then names for it (a reload's
        superseded ones were discarded by that reload)."""
        self._waiting[name] = (previous, replacement)
        if previous in self._watched:
            return
        self._watched.add(previous)

        def wait() -> None:
            previous.join()
            with self._lock:
                self._watched.discard(previous)
                if self._stopped:
                    return
                for key, (stopped, waiting) in list(self._waiting.items()):
                    if stopped is not previous:
                        continue
                    del self._waiting[key]
                    self.listeners[key] = waiting
                    _start(waiting)
                    LOGGER.info("[%s] started: the listener it replaces has stopped", key)

        threading.Thread(target=wait, name="golconde-replace-%s" % previous.name, daemon=True).start()

    # -- main loop -----------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == getattr(signal, "SIGHUP", None):
            self._reload.set()
            return
        self._signals += 1
        if self._signals > 1:
            LOGGER.error("second signal: forcing exit")
            os._exit(1)
        LOGGER.info("signal %d: stopping", signum)
        self._stop.set()

    def run(self) -> int:
        """Install signal handlers (main thread only), start, and serve until stopped.
        Returns the process exit status (0 = clean stop)."""
        for signum in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)):
            if signum is not None:
                signal.signal(signum, self._on_signal)
        self.start()
        while not self._stop.is_set():
            self._stop.wait(0.5)
            if self._reload.is_set():
                self._reload.clear()
                try:
                    self.reload()
                except (Exception, SystemExit):   # a reload never ends the daemon: log, serve on
                    LOGGER.exception("reload failed part-way; the listeners that run keep running")
        return 0 if self.stop() else 1
