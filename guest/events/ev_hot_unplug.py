"""Event ``hot-unplug``: the guest's steps.

Stream, tell the host (READY_FILE), wait until the device is gone.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_hot_unplug.py.
"""

NAME = "hot-unplug"


def run(c):
    c.stream_until_removed()
