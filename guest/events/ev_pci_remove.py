"""Event ``pci-remove``: the guest's steps.

As hot-unplug: the host removes the PCI function through sysfs instead.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_pci_remove.py.
"""

NAME = "pci-remove"


def run(c):
    c.stream_until_removed()
