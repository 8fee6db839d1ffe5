"""Event ``dma-write``: the guest's steps.

Nothing happens after generation 1: the baseline.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_dma_write.py.
"""

NAME = "dma-write"


def run(c):
    pass
