"""Event ``truncate-never-unpin``: the guest's steps.

fsdax only: the truncate of ev_truncate while the device never stops and the driver never
unpins. The shrink runs in a child that is watched for pinlab_dax.NEVER_S seconds and then
killed (pinlab_dax.watch_never_released); odp is revoked, the shrink returns and the event
goes on as truncate.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_truncate_never_unpin.py.
"""
from pinlab.guest.events.ev_truncate import truncate

NAME = "truncate-never-unpin"


def run(c):
    truncate(c, never_unpin=True)
