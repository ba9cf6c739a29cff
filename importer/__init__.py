"""The import pipeline: certificates, CRLs and OpenSSL CA databases into the store.

Layers (imports point down; ``store`` never imports this package, and this package never
imports ``server``):

- ``settings``: the plain values it needs (built from the server's configuration by the CLI).
- ``formats``: what a file holds (PEM, DER, PKCS#7), by content.
- ``parse``: certificates into the store's rows (``CertRow``) with cryptography's Rust parser.
- ``verify``: only what a configured CA signed is accepted.
- ``pool``: worker processes that read, parse and verify while one process writes.
- ``batch``: batches of files written in one transaction each (``Importer``).
- ``openssl_index``: OpenSSL's index.txt and its certificate files.
- ``progress``: the summary line and progress output.
- ``run``: ``certpub import``; ``spool``: ``certpub importd``, the daemon.
"""
