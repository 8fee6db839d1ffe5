"""Private Unix sockets: 0600 sockets in a 0700 directory; only sockets are replaced."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import stat


def private_dir(path: str) -> None:
    """Make sure directory ``path`` is private to us: create it 0700 if missing; refuse
    (PermissionError) an existing one that is not ours or that group/others can write."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        os.makedirs(path, mode=0o700)
        os.chmod(path, 0o700)  # the umask may have narrowed it; never widened
        return
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise PermissionError(errno.EPERM, "socket directory must be ours and writable "
                                           f"only by us (mode {st.st_mode & 0o7777:o})", path)


def remove_socket(path: str, ident: tuple[int, int] | None = None) -> None:
    """Unlink ``path`` if it is a socket (and, with ``ident`` = (st_dev, st_ino), that
    very socket). Anything else is left alone: FileExistsError if it is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket: not replaced", path)
    if ident is None or (st.st_dev, st.st_ino) == ident:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def listen_unix(path: str, backlog: int) -> tuple[socket.socket, tuple[int, int]]:
    """A listening Unix stream socket at ``path``, mode 0600, in a private directory
    (:func:`private_dir`), replacing a stale *socket* only. The socket is bound, listening
    and 0600 under a temporary name first, then renamed to ``path``: once ``path`` exists
    it accepts connections. Returns the socket and its (st_dev, st_ino) for
    :func:`remove_socket`. Raises OSError."""
    d = os.path.dirname(os.path.abspath(path))
    private_dir(d)
    remove_socket(path)
    tmp = os.path.join(d, f".{os.path.basename(path)[:40]}.{os.getpid()}")
    remove_socket(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o600)  # the directory keeps others out until then
        sock.listen(backlog)
        st = os.lstat(tmp)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            remove_socket(tmp)
        raise
    return sock, (st.st_dev, st.st_ino)


def readable(fds: list[int], timeout: float | None = None) -> set[int]:
    """The fds of ``fds`` that are readable (or hung up) within ``timeout`` seconds (None:
    wait). poll(2), not select(2): fd numbers past 1023 are fine."""
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    events = p.poll(None if timeout is None else timeout * 1000)
    return {fd for fd, _ in events}
