"""The xenstore wire protocol, as ``xen/include/public/io/xs_wire.h`` defines it.

Shared by torpor's xenstore adapter and by the simulated xenstored, so that
both speak exactly the protocol Xen's C library and guest kernels speak.

A message is a 16-byte header ``<IIII`` -- type, req_id, tx_id, len -- then
``len`` bytes of payload, usually NUL-terminated strings.  Replies echo type,
req_id and tx_id; errors come back as ``XS_ERROR`` with the errno's *name*
(``"ENOENT\\0"``).  Watch events are ``XS_WATCH_EVENT`` with req_id 0 and the
payload ``path\\0token\\0``.
"""

from __future__ import annotations

import enum
import errno
import struct

__all__ = [
    "ABS_PATH_MAX",
    "ERRNO_BY_NAME",
    "HEADER",
    "PAYLOAD_MAX",
    "REL_PATH_MAX",
    "WIRE_ERRORS",
    "Op",
    "decode_error",
    "encode_error",
]

#: ``struct xsd_sockmsg``: type, req_id, tx_id, len (host byte order; x86 is little endian).
HEADER = struct.Struct("<IIII")

#: "Violating this is very bad" (xs_wire.h): the largest payload of one message.
PAYLOAD_MAX = 4096
#: Longest absolute path, and longest relative path, xenstored accepts.
ABS_PATH_MAX = 3072
REL_PATH_MAX = 2048


class Op(enum.IntEnum):
    """``enum xsd_sockmsg_type``."""

    DEBUG = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESTRICT = 20
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    INVALID = 0xFFFF


#: ``xsd_errors[]``: the errno values that travel on the wire, by name.
WIRE_ERRORS: tuple[int, ...] = (
    errno.EINVAL,
    errno.EACCES,
    errno.EEXIST,
    errno.EISDIR,
    errno.ENOENT,
    errno.ENOMEM,
    errno.ENOSPC,
    errno.EIO,
    errno.ENOTEMPTY,
    errno.ENOSYS,
    errno.EROFS,
    errno.EBUSY,
    errno.EAGAIN,
    errno.EISCONN,
    errno.E2BIG,
    # Added in Xen 4.17's xs_wire.h: XS_SET_PERMS by an unprivileged domain
    # that tries to change a node's owner (do_set_perms()).
    errno.EPERM,
)

ERRNO_BY_NAME: dict[str, int] = {errno.errorcode[e]: e for e in WIRE_ERRORS}


def encode_error(code: int) -> bytes:
    """The XS_ERROR payload for ``code``: its name and a NUL.

    Like C xenstored's ``send_error``, an errno outside ``xsd_errors`` is sent as
    EINVAL, because a client could not decode it.
    """
    name = errno.errorcode.get(code)
    if code not in WIRE_ERRORS or name is None:
        name = "EINVAL"
    return name.encode("ascii") + b"\0"


def decode_error(payload: bytes) -> int:
    """The errno of an XS_ERROR payload, tolerating a missing trailing NUL.

    An unknown name decodes as EINVAL rather than 0: errno 0 would read as success.
    """
    name = payload.split(b"\0", 1)[0].decode("ascii", "replace").strip()
    code = getattr(errno, name, None) if name.startswith("E") else None
    return code if isinstance(code, int) else errno.EINVAL
