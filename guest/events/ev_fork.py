"""Event ``fork``: the guest's steps.

fork; the parent writes (COW), the device writes generation 2, the child reports its view.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_fork.py.
"""

NAME = "fork"


def run(c):
    c.fork_and_look(dontfork=False)
