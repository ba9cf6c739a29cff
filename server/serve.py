"""``certpub serve``: run the reactor with both services, reload on SIGHUP, stop on SIGTERM."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from server.config import Config, load_config
from server.configtools import ConfigError

log = Logger()


def serve(config: Config, config_path: Path, *,
          inherited: Mapping[str, socket.socket] | None = None,
          on_started: Callable[[str | None], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code (a worker: inherited sockets, on_started)."""
    from twisted.internet import reactor

    from server import app
    from server.logs import start_logging

    start_logging(config.log.format, config.log.level, config.log.file)
    state: dict[str, Any] = {"code": 0, "config": config}

    @defer.inlineCallbacks
    def begin() -> Any:
        try:
            state["running"] = yield app.start(config, reactor, inherited=inherited)
        except Exception as exc:
            log.error("cannot start: {error}", error=str(exc))
            # A signer refused at start (e.g. a token key: wrong PIN, no such object) is a
            # configuration error: EX_CONFIG, as `certpub check-config` exits.
            state["code"] = 78 if isinstance(exc, ConfigError) else 1
            if on_started is not None:
                on_started(str(exc) or type(exc).__name__)
            reactor.stop()  # type: ignore[attr-defined]
            return
        if on_started is not None:
            on_started(None)

    def reload() -> None:
        try:
            new = load_config(config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: {error}", error=str(exc))
            return
        running = state.get("running")
        if running is None:
            return
        for name, service in running.services.items():
            hook = getattr(service, "reload", None)
            if hook is None:
                continue
            try:
                hook(new)
            except Exception as exc:
                log.error("reload of {service} refused, keeping the old one: {error}",
                          service=name, error=str(exc))
                return
        state["config"] = new
        log.info("configuration reloaded from {path}", path=str(config_path))

    def on_hup(*_: object) -> None:
        reactor.callFromThread(reload)  # type: ignore[attr-defined]

    def on_term(*_: object) -> None:
        log.info("stopping")
        reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]

    # Handlers first: a worker reports "started" from begin, and may get SIGHUP right after.
    reactor.callWhenRunning(lambda: signal.signal(signal.SIGHUP, on_hup))  # type: ignore[attr-defined]
    reactor.callWhenRunning(lambda: signal.signal(signal.SIGTERM, on_term))  # type: ignore[attr-defined]
    reactor.callWhenRunning(begin)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    running = state.get("running")
    if running is not None:
        running.close()  # the feed's LISTEN thread, the store threads, the store
    return int(state["code"])
