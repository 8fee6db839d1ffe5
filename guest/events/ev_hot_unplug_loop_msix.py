"""Event ``hot-unplug-loop-msix`` (module ev_hot_unplug_loop_msix): the guest's steps of
one cycle, as ``hot-unplug-loop``; the device has MSI-X.

Stream, tell the host (READY_FILE), wait until the device is gone.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_hot_unplug_loop_msix.py.
"""

NAME = "hot-unplug-loop-msix"


def run(c):
    c.stream_until_removed()
