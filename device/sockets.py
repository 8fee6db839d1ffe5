"""Private Unix sockets: 0600 sockets in a 0700 directory; only sockets are replaced."""

from __future__ import annotations

import contextlib
import errno
import os
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
    (:func:`private_dir`), replacing a stale *socket* only. Returns the socket and its
    (st_dev, st_ino) for :func:`remove_socket`. Raises OSError."""
    private_dir(os.path.dirname(os.path.abspath(path)))
    remove_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)  # the directory keeps others out until then
        st = os.lstat(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)
