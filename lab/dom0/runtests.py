#!/usr/bin/python3
"""Run the lab's pytest session inside dom0 and leave the results for the host.

Started by dom0's init (lab/dom0/init) with Debian's python3.  Reads what the
host prepared in /mnt/run/in/job.json (PYTHONPATH, pytest arguments, time
limit), runs pytest with its output in /mnt/run/out/pytest.log and junit XML
in /mnt/run/out/junit.xml, writes /mnt/run/out/exit-code, and copies Xen's
logs (guest consoles, xl and device-model logs, `xl dmesg`) next to them.
Its own exit status is pytest's, which init reports as "TORPOR-LAB done rc=N".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

RUN = "/mnt/run"
OUT = f"{RUN}/out"


def console(msg: str) -> None:
    print(f"TORPOR-LAB {msg}", flush=True)


def capture(cmd: list[str], dest: str) -> None:
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
        data = r.stdout + r.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        data = f"{cmd}: {e}\n".encode()
    with open(dest, "wb") as f:
        f.write(data)


def diagnostics() -> None:
    capture(["xl", "list"], f"{OUT}/xl-list.txt")
    capture(["xl", "dmesg"], f"{OUT}/xl-dmesg.txt")
    capture(["dmesg"], f"{OUT}/dom0-dmesg.txt")
    if os.path.isdir("/var/log/xen"):
        shutil.copytree("/var/log/xen", f"{OUT}/xen-logs", dirs_exist_ok=True)


def main() -> int:
    with open(f"{RUN}/in/job.json") as f:
        job = json.load(f)
    os.makedirs(OUT, exist_ok=True)
    # The vendored dependencies, from one tar on the share into tmpfs.
    parent = os.path.dirname(job["site_dir"])
    os.makedirs(parent, exist_ok=True)
    with tarfile.open(job["site_tar"]) as tar:
        tar.extractall(parent)
    # torpor as installed from its wheels (packages, metadata, bin/torpor).
    with tarfile.open(job["torpor_tar"]) as tar:
        tar.extractall(os.path.dirname(job["torpor_dir"]))
    env = dict(os.environ)
    env["PYTHONPATH"] = ":".join(job["pythonpath"])
    env["PATH"] = f"{job['torpor_dir']}/bin:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    # The repo share is read-only: compiled sources are kept in tmpfs.
    env["PYTHONPYCACHEPREFIX"] = "/run/torpor-lab/pycache"
    env["TORPOR_LAB_OUT"] = OUT
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "torpor_lab_progress",
        "-p",
        "no:cacheprovider",
        f"--junitxml={OUT}/junit.xml",
        *job["pytest_args"],
    ]
    console("pytest starting")
    with open(f"{OUT}/pytest.log", "wb") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=job.get("cwd", "/mnt/repo"),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            rc = proc.wait(timeout=job["timeout"])
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = 124
            log.write(f"\n[torpor-lab] pytest killed after {job['timeout']}s\n".encode())
            console(f"timeout pytest killed after {job['timeout']}s")
    with open(f"{OUT}/exit-code", "w") as f:
        f.write(f"{rc}\n")
    diagnostics()
    return rc


if __name__ == "__main__":
    sys.exit(main())
