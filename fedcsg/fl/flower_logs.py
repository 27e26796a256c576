"""The lines fedcsg keeps out of Flower's log, each with its reason: what Flower logs there that a
user can do nothing about, because fedcsg reports it otherwise or it is the design."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FLOWER_LOGGER = "flwr"


class ReportedClientErrors(logging.Filter):
    """Drops the tracebacks Flower's simulation engine logs at ERROR for a ClientApp that raised
    (about 30 lines each): the reply becomes an Error message, which the strategy reports in one line
    (round, node, partition, reason). Installed on the ``flwr`` logger unless ``--verbose``."""

    SOURCES = (("vce_api.py", "worker"), ("raybackend.py", "process_message"))

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or (Path(record.pathname).name, record.funcName) not in self.SOURCES


REPORTED_CLIENT_ERRORS = ReportedClientErrors()


class SkippedFederatedEvaluation(logging.Filter):
    """Drops FedAvg's warning "fraction_evaluate is set to 0.0. Federated evaluation will be
    skipped.": every fedcsg arm evaluates the global model on the server's test split and sends no
    evaluate message by design, so the warning would print once per arm with nothing to act on."""

    MESSAGE = "fraction_evaluate is set to 0.0"

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.MESSAGE)


@contextmanager
def without_skipped_evaluation_warning() -> Iterator[None]:
    """Within the block, :class:`SkippedFederatedEvaluation` filters Flower's logger (the block
    constructs the strategy; Flower logs the warning from ``FedAvg.__init__``)."""
    logger = logging.getLogger(FLOWER_LOGGER)
    dropped = SkippedFederatedEvaluation()
    logger.addFilter(dropped)
    try:
        yield
    finally:
        logger.removeFilter(dropped)
