"""hpb-node: the service (ingest, spool, rules, queue, workers, export, admin)."""

__version__ = "0.1.0"
