"""Event ``oom``: the guest's steps.

A second process registers, streams and is killed by the memcg OOM killer.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_oom.py.
"""

NAME = "oom"


def run(c):
    c.victim(oom=True)
