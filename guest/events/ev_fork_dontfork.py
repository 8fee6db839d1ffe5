"""Event ``fork-dontfork``: the guest's steps.

fork after MADV_DONTFORK.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_fork_dontfork.py.
"""

NAME = "fork-dontfork"


def run(c):
    c.fork_and_look(dontfork=True)
