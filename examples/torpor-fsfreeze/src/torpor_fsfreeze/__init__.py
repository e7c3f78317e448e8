"""torpor-fsfreeze: freeze a guest's filesystems through its QEMU guest agent while torpor
suspends it (an example of a plugin that uses torpor's veto point)."""

from torpor_fsfreeze.plugin import FsFreeze

__all__ = ["FsFreeze"]
