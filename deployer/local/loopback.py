"""A guard for everything that runs on the emulator: no connection leaves the machine.

The test suite, the benchmarks and the demo install it, so a misconfigured client (a missing
endpoint, botocore looking for instance metadata) fails loudly instead of reaching AWS or
169.254.169.254. It sees this process's connects; agents started as subprocesses get an
explicit endpoint and instance id instead.
"""

from __future__ import annotations

import ipaddress
import sys


def _loopback_only(event: str, args: tuple[object, ...]) -> None:
    if event != "socket.connect":
        return
    address = args[1]
    if isinstance(address, tuple) and address and isinstance(address[0], str):
        host = address[0]
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = host == "localhost"
        if not ok:
            raise ConnectionRefusedError(f"only loopback may be reached here, not {host}")


_installed = False


def install_loopback_guard() -> None:
    """Fail every connect of this process to anything but loopback (idempotent; audit hooks stay for life)."""
    global _installed
    if not _installed:
        sys.addaudithook(_loopback_only)
        _installed = True
