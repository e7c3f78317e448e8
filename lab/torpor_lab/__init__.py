"""The torpor real-Xen lab: a Xen 4.17 + Debian 12 dom0 booted under QEMU (TCG).

Host side only, standard library only, so `lab/run` works with any system
python3 (no venv).  Modules:

  util      phase reporting, bounded subprocesses, the error type
  hostdeps  host Debian packages: check, install when root, name them otherwise
  image     the dom0 image recipe, its hash, the cached build
  vendor    torpor's Python dependencies for dom0's python3, and its dist-info
  qemu      booting the image and watching the serial console
  report    reading pytest's junit XML back into a per-test summary
  cli       `lab/run`: the phases in order
"""
