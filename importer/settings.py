"""What the importer needs to know, as plain values (it never reads the server's configuration).

Strategy: the composition roots (``certpub import``, ``certpub importd``) hand over their
parsed configuration; ``ImportSettings.of`` copies the few values the importer uses out of any
object shaped like ``server.config.Config`` (duck-typed, so ``importer`` imports nothing from
``server``). Errors about those values are ``SetupError``s naming the configuration key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SetupError(Exception):
    """A configured value the importer cannot use; str() names the key path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


@dataclass(frozen=True)
class CaSource:
    """A configured CA: its name and the file holding its certificate."""

    name: str
    certificate: Path


@dataclass(frozen=True)
class OpensslDatabase:
    """An OpenSSL CA database: index.txt plus the folder of issued certificates."""

    ca: str
    index: Path
    certs_dir: Path


@dataclass(frozen=True)
class ImportSettings:
    """The importer's settings: store location, trust anchors, inputs, batching."""

    location: str
    migrate: bool
    cas: tuple[CaSource, ...]
    spool: tuple[Path, ...] = ()
    openssl: tuple[OpensslDatabase, ...] = ()
    processed: str = "move"  # "move" (to <spool>/done) or "delete"
    poll_interval: float = 1.0
    batch_size: int = 500
    workers: int = 0  # processes that parse and verify; 0: one per CPU (at most 8)

    @classmethod
    def of(cls, config: Any) -> ImportSettings:
        """Settings from a ``server.config.Config`` (or these settings themselves)."""
        if isinstance(config, ImportSettings):
            return config
        im = config.import_
        return cls(
            location=str(config.store.location),
            migrate=config.store.migrate == "auto",
            cas=tuple(CaSource(ca.name, Path(ca.certificate)) for ca in config.cas),
            spool=tuple(Path(p) for p in im.spool),
            openssl=tuple(OpensslDatabase(db.ca, Path(db.index), Path(db.certs_dir))
                          for db in im.openssl),
            processed=im.processed,
            poll_interval=float(im.poll_interval),
            batch_size=int(im.batch_size),
        )

    @property
    def processes(self) -> int:
        """How many worker processes parse and verify."""
        return self.workers if self.workers > 0 else min(os.cpu_count() or 1, 8)
