"""A ``twisted.logger.Logger`` made on first use, for modules that import no Twisted.

Strategy: the pure OCSP core (``server.ocsp.service``) logs through Twisted's logger like the
rest of the server, but importing it must not import Twisted (its users may be a signing
process or a tool); ``LazyLogger`` imports ``twisted.logger`` only when a line is logged.
"""

from __future__ import annotations

from typing import Any


class LazyLogger:
    """Stands for ``twisted.logger.Logger(namespace=...)``; built when first called."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._logger: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._logger is None:
            from twisted.logger import Logger

            self._logger = Logger(namespace=self.namespace)
        return getattr(self._logger, name)
