"""Event ``exit``: the guest's steps.

A second process registers, streams and dies by SIGKILL.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_exit.py.
"""

NAME = "exit"


def run(c):
    c.victim(oom=False)
