"""Event ``dma-write``: the guest's steps.

Nothing happens after generation 1: the baseline. With the option ``readonly``: nothing
happens between the device's two reads (run_readonly).

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_dma_write.py.
"""

NAME = "dma-write"


def run(c):
    pass


def run_readonly(c):
    """The read-only flow (guest/pinlab_readonly.py): nothing happens between the device's
    two reads; the process keeps seeing the old contents."""
    return None
