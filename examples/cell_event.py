#!/usr/bin/env python3
"""Run one matrix cell by hand: make its mapping with the matrix's own code
(pinlab_cell.ready_cell), stop before the event, run the event, print the report.

Run in a guest booted for that cell:

    pinlab up --cell 6.12/pin/ext4/2018 --name c
    pinlab run c examples/cell_event.py pin ext4 2018 [--pause S]

``--pause`` waits S seconds before the event (time to set a breakpoint in gdb, or to look
at the mapping from a second shell: the pid and the address are printed first). The last
line of output is the cell's report, as the matrix's workload.json has it, plus the
kernel log lines the cell added.
"""
import argparse
import json
import os
import time

from pinlab.guest import pinlab_cell, pinlab_kmsg


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode")
    p.add_argument("backing")
    p.add_argument("event")
    p.add_argument("--pause", type=float, default=0)
    a = p.parse_args()
    mark = pinlab_kmsg.mark()
    c = pinlab_cell.ready_cell(a.mode, a.backing, a.event)
    try:
        state = (f"region {c.rid} registered, generation 1 written" if c.registered
                 else f"registration refused: {c.rep['errno_name']}")
        print(f"pid {os.getpid()}: mapping at {c.m.addr:#x}, {c.m.npages} pages "
              f"({c.m.path or c.m.kind}); {state}", flush=True)
        if c.registered:
            if a.pause:
                print(f"event {a.event} in {a.pause:g} s", flush=True)
                time.sleep(a.pause)
            c.event()
        rep = c.finish()
    finally:
        c.close()
    rep["dmesg"] = pinlab_kmsg.since(mark)
    print(json.dumps(rep, default=str))


if __name__ == "__main__":
    main()
