"""The kernel log from a mark on, read from /dev/kmsg (Documentation/ABI/testing/dev-kmsg).

Guest API (standard library only):

    m = pinlab_kmsg.mark()             # sequence number of the next record (int)
    ...                                # the experiment
    for line in pinlab_kmsg.since(m):  # "[   12.345678] pinlab 0000:01:00.0: ..."
        print(line)

A mark is a record sequence number, so it can be passed between processes (and over
``pinlab run``). Records already overwritten in the ring buffer are skipped; ``since``
reports how many through ``lost`` of ``read_since``. Errors: OSError opening /dev/kmsg
(EPERM without CAP_SYSLOG when dmesg_restrict=1).
"""
import os


def format_record(record):
    """A kmsg record ("pri,seq,usec,flags;text\\n KEY=v...") as dmesg prints it."""
    head, _, rest = record.partition(";")
    text = rest.split("\n", 1)[0]
    try:
        usec = int(head.split(",")[2])
    except (IndexError, ValueError):
        usec = 0
    return f"[{usec // 1000000:5d}.{usec % 1000000:06d}] {text}"


def record_seq(record):
    """The sequence number of a kmsg record (int)."""
    return int(record.split(";", 1)[0].split(",")[1])


def read_records(fd):
    """(records, lost): every record readable from a non-blocking /dev/kmsg fd, as text,
    and how many were overwritten before they could be read (EPIPE)."""
    records, lost = [], 0
    while True:
        try:
            rec = os.read(fd, 8192)
        except BlockingIOError:
            break
        except BrokenPipeError:
            lost += 1
            continue
        if not rec:
            break
        records.append(rec.decode(errors="replace"))
    return records, lost


def _open():
    return os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


def mark():
    """The sequence number the next kernel log record will get (int)."""
    fd = _open()
    try:
        records, _ = read_records(fd)
    finally:
        os.close(fd)
    return record_seq(records[-1]) + 1 if records else 0


def read_since(seq):
    """(lines, lost): the kernel log records numbered seq or later, formatted as by
    dmesg, and how many records were lost to ring-buffer overwrite while reading."""
    fd = _open()
    try:
        records, lost = read_records(fd)
    finally:
        os.close(fd)
    return [format_record(r) for r in records if record_seq(r) >= seq], lost


def since(seq):
    """The kernel log lines logged since mark() returned seq (list of str)."""
    return read_since(seq)[0]
