"""The simulated xenstored's data model: nodes, permissions, paths, transactions.

This mirrors how Xen 4.17's C xenstored keeps its store (tools/xenstore/
xenstored_core.c, xenstored_transaction.c): one flat key/value data base whose
keys are node paths (``/local/domain/1/name``) or, for a node a transaction has
touched, ``<transaction generation>/<path>``; each value is a node record
(generation count, permission list, data, NUL-separated child names).  Keeping
the same shape keeps the same semantics -- conflict detection by generation
count, per-domain accounting of record sizes -- without re-deriving them.

Nothing here does I/O; :mod:`torpor_sim.xenstored` drives it.
"""

from __future__ import annotations

import re

__all__ = [
    "NO_GENERATION",
    "PERM_IGNORE",
    "PERM_NONE",
    "PERM_OWNER",
    "PERM_READ",
    "PERM_WRITE",
    "RECORD_HEADER_SIZE",
    "Accessed",
    "Node",
    "Perm",
    "Record",
    "Transaction",
    "basename",
    "c_atoi",
    "child_name",
    "format_perm",
    "get_parent",
    "is_child",
    "is_valid_nodename",
    "parse_perm",
]

# struct xs_permissions.perms (tools/include/xenstore_lib.h)
PERM_NONE = 0x00
PERM_READ = 0x01
PERM_WRITE = 0x02
#: Internal: granted to owners and privileged domains by perm_for_conn().
PERM_OWNER = 0x08
#: Internal: the entry names a domain that died after the node was written
#: (domain_adjust_node_perms(), XSA-322); it no longer grants anything.
PERM_IGNORE = 0x10

#: ``NO_GENERATION`` (xenstored_core.h): the generation of a node that is absent.
NO_GENERATION = (1 << 64) - 1

#: sizeof(struct xs_tdb_record_hdr) (tools/xenstore/utils.h): a u64 generation
#: and three u32 counts, padded to 8 bytes.  Each permission adds 8 bytes.
RECORD_HEADER_SIZE = 24
PERM_SIZE = 8

#: One ACL entry: (domid as u32, PERM_* flags).
Perm = tuple[int, int]

_PERM_CHARS = {"n": PERM_NONE, "r": PERM_READ, "w": PERM_WRITE, "b": PERM_READ | PERM_WRITE}
_PERM_LETTER = {PERM_NONE: "n", PERM_READ: "r", PERM_WRITE: "w", PERM_READ | PERM_WRITE: "b"}

_U32 = 0xFFFFFFFF


class Record:
    """A node as stored in the data base (``struct xs_tdb_record_hdr`` + body).

    Records are never changed once stored; a write stores a new one, so readers
    may share them.
    """

    __slots__ = ("childlen", "children", "data", "generation", "perms")

    def __init__(
        self,
        generation: int,
        perms: tuple[Perm, ...],
        data: bytes,
        children: tuple[str, ...],
        childlen: int,
    ) -> None:
        self.generation = generation
        self.perms = perms
        self.data = data
        self.children = children
        self.childlen = childlen

    def size(self) -> int:
        """The record's size in the data base, as do_tdb_write() accounts it."""
        return RECORD_HEADER_SIZE + PERM_SIZE * len(self.perms) + len(self.data) + self.childlen


class Node:
    """A node being worked on (``struct node``): a mutable copy of a record.

    ``parent`` is set only for nodes construct_node() creates and for nodes a
    tree walk visits, as in C; ``key`` is the data base key it was last written
    under.
    """

    __slots__ = ("childlen", "children", "data", "generation", "key", "name", "parent", "perms")

    def __init__(
        self,
        name: str,
        *,
        generation: int = NO_GENERATION,
        perms: tuple[Perm, ...] = (),
        data: bytes = b"",
        children: tuple[str, ...] = (),
        childlen: int = 0,
    ) -> None:
        self.name = name
        self.generation = generation
        self.perms = perms
        self.data = data
        self.children = children
        self.childlen = childlen
        self.parent: Node | None = None
        self.key = name

    @classmethod
    def from_record(cls, name: str, rec: Record) -> Node:
        return cls(
            name,
            generation=rec.generation,
            perms=rec.perms,
            data=rec.data,
            children=rec.children,
            childlen=rec.childlen,
        )

    def to_record(self) -> Record:
        return Record(self.generation, self.perms, self.data, self.children, self.childlen)

    def size(self) -> int:
        """What write_node_raw() compares against the entry-size quota."""
        return RECORD_HEADER_SIZE + PERM_SIZE * len(self.perms) + len(self.data) + self.childlen

    def add_child(self, base: str) -> None:
        self.children = (*self.children, base)
        self.childlen += len(base) + 1

    def remove_child(self, base: str) -> bool:
        if base not in self.children:
            return False
        kids = list(self.children)
        kids.remove(base)
        self.children = tuple(kids)
        self.childlen -= len(base) + 1
        return True

    def children_bytes(self) -> bytes:
        """The child list as the wire carries it: each name NUL-terminated."""
        if not self.children:
            return b""
        return ("\0".join(self.children) + "\0").encode("latin-1")


class Accessed:
    """A node a transaction has touched (``struct accessed_node``)."""

    __slots__ = (
        "check_gen",
        "fire_watch",
        "generation",
        "modified",
        "perms",
        "ta_node",
        "trans_name",
        "watch_exact",
    )

    def __init__(self, trans_name: str) -> None:
        self.trans_name = trans_name
        #: Generation when first read (NO_GENERATION if absent), checked at commit.
        self.generation = 0
        #: Permissions before the transaction touched it (for watch_permitted()).
        self.perms: tuple[Perm, ...] | None = None
        self.check_gen = False
        self.modified = False
        #: Is there a transaction-private copy under ``trans_name``?
        self.ta_node = False
        self.fire_watch = False
        self.watch_exact = False


class Transaction:
    """One open transaction of a connection (``struct transaction``)."""

    __slots__ = (
        "accessed",
        "changed_domains",
        "conn_id",
        "fail",
        "generation",
        "id",
        "node_created",
        "nodes",
    )

    def __init__(self, tx_id: int, generation: int, conn_id: int) -> None:
        self.id = tx_id
        self.generation = generation
        self.conn_id = conn_id
        #: Accessed nodes by path, in first-access order (commit fires in this order).
        self.accessed: dict[str, Accessed] = {}
        #: Net change of each domain's node count, applied at commit.
        self.changed_domains: dict[int, int] = {}
        #: How many nodes were ever introduced (quota "transaction-nodes").
        self.nodes = 0
        self.node_created = False
        #: Set when a change could not be made or undone: the commit then fails.
        self.fail = False

    def key_for(self, name: str) -> str:
        """The data base key of this transaction's private copy of ``name``."""
        return f"{self.generation}/{name}"


# -- paths ------------------------------------------------------------------

_VALID_CHARS = re.compile(r"[A-Za-z0-9\-/_@]*\Z")
# sscanf(node, "/local/domain/%5u/%n", ...): at most 5 characters, sign included.
_LOCAL_PREFIX = re.compile(r"/local/domain/(?:[+-]?\d{1,4}|\d{5})/")


def is_valid_nodename(name: str, path_max: int) -> bool:
    """is_valid_nodename() (xenstored_core.c).

    Absolute, no trailing or double slash, only ``[A-Za-z0-9-/_@]``, and at most
    ``path_max`` characters once a leading ``/local/domain/<id>/`` is discounted.
    """
    if not name.startswith("/"):
        return False
    if name.endswith("/") and name != "/":
        return False
    if "//" in name:
        return False
    m = _LOCAL_PREFIX.match(name)
    local_off = m.end() if m else 0
    if len(name) > local_off + path_max:
        return False
    return _VALID_CHARS.match(name) is not None


def get_parent(name: str) -> str:
    """get_parent(): ``/a/b`` -> ``/a``; ``/a`` and ``/`` -> ``/``."""
    i = name.rfind("/")
    return "/" if i <= 0 else name[:i]


def basename(name: str) -> str:
    return name[name.rfind("/") + 1 :]


def child_name(parent: str, child: str) -> str:
    return "/" + child if parent == "/" else parent + "/" + child


def is_child(child: str, parent: str) -> bool:
    """is_child() (xenstored_watch.c): ``child`` is ``parent`` or below it; all is below ``/``."""
    if parent == "/":
        return True
    if not child.startswith(parent):
        return False
    return len(child) == len(parent) or child[len(parent)] == "/"


# -- C conversions ------------------------------------------------------------

_ATOI = re.compile(r"[ \t\n\v\f\r]*([+-]?\d+)")
_STRTOL = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)")


def c_atoi(text: str) -> int:
    """C ``atoi()``: leading digits after blanks and a sign; 0 if none.

    The result is truncated to a C ``int`` as the library does.
    """
    m = _ATOI.match(text)
    if not m:
        return 0
    v = int(m.group(1)) & _U32
    return v - (1 << 32) if v & 0x80000000 else v


def _c_strtol_full(text: str) -> int | None:
    """C ``strtol(text, &end, 0)`` requiring ``*end == 0``; None if it would not."""
    m = _STRTOL.match(text)
    if not m or m.end() != len(text):
        return None
    sign, digits = m.groups()
    if digits.startswith(("0x", "0X")):
        v = int(digits[2:], 16)
    elif digits.startswith("0") and len(digits) > 1:
        v = int(digits[1:], 8)
    else:
        v = int(digits)
    v = -v if sign == "-" else v
    # strtol saturates at LONG_MIN/LONG_MAX (64-bit) before the u32 store.
    return max(-(1 << 63), min(v, (1 << 63) - 1))


def parse_perm(text: str) -> Perm | None:
    """One entry of xs_strings_to_perms() (tools/xenstore/xs_lib.c).

    ``r5``, ``w0x10``, ``b010`` (strtol base 0), ``n0``.  The domid is stored as
    an unsigned 32-bit value.  None means EINVAL.
    """
    if not text or text[0] not in _PERM_CHARS or len(text) == 1:
        return None
    value = _c_strtol_full(text[1:])
    if value is None:
        return None
    return (value & _U32, _PERM_CHARS[text[0]])


def format_perm(perm: Perm) -> str:
    """xs_perm_to_string(): letter, then the domid printed with ``%i``."""
    domid, flags = perm
    letter = _PERM_LETTER[flags & (PERM_READ | PERM_WRITE)]
    signed = domid - (1 << 32) if domid & 0x80000000 else domid
    return f"{letter}{signed}"
