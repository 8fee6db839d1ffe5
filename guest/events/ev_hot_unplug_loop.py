"""Event ``hot-unplug-loop`` (module ev_hot_unplug_loop): the guest's steps of one cycle.

Stream, tell the host (READY_FILE), wait until the device is gone; the host runs this
once per device_del/device_add cycle.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_hot_unplug_loop.py.
"""

NAME = "hot-unplug-loop"


def run(c):
    c.stream_until_removed()
