"""A second "host" for the tests: a network namespace joined to this one by a veth pair,
made by the test and removed after it. Only root can make one; ``unavailable`` says
why a test must skip elsewhere.

The servers of the test listen on ``Host.address``, this side's end of the pair, which
processes here reach too. A process run with ``Host.command`` has only the pair: cutting
the link (``cut``) takes the namespace's end down, so the host's packets go nowhere and
its new connections fail at once, as when a machine loses its network; ``restore`` brings
it back with its route, and the connections it kept open carry on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

IP = shutil.which("ip") or "/usr/sbin/ip"  # iproute2
# The /30 networks a pair may take: 10.213.0.0/16 has 16,384 of them.
_POOL = ipaddress.IPv4Network("10.213.0.0/16")


@dataclasses.dataclass(frozen=True, slots=True)
class Host:
    """A network namespace and the veth pair that joins it to this one."""

    namespace: str
    outer: str  # the pair's end in this namespace
    inner: str  # the pair's end in the host's namespace
    address: str  # the outer end's address: servers listen here for the host
    peer: str  # the inner end's address: the host's connections come from here
    network: str  # the pair's network, both ends' addresses

    def command(self, args: list[str]) -> list[str]:
        """``args`` run inside the host's namespace."""
        return [IP, "netns", "exec", self.namespace, *args]

    def cut(self) -> None:
        """Take the host's end of the link down: nothing goes in or out any more."""
        _ip("-n", self.namespace, "link", "set", "dev", self.inner, "down")

    def restore(self) -> None:
        """Bring the host's end of the link up again, with the route to this side."""
        _ip("-n", self.namespace, "link", "set", "dev", self.inner, "up")


def unavailable() -> str | None:
    """Why a namespace cannot be made here, or None if it can be tried."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if not Path(IP).is_file():
        return "the ip command (iproute2) is not installed"
    try:
        with separate_host():
            return None
    except OSError as exc:
        return f"a network namespace and a veth pair cannot be made here: {exc}"


def _ip(*args: str, check: bool = True) -> str:
    """What ``ip ARGS`` printed; OSError saying what failed unless ``check`` is false."""
    done = subprocess.run([IP, *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _free_network() -> ipaddress.IPv4Network:
    """A /30 of the pool that no address of this namespace is in (other tests may hold
    pairs of their own at the same time)."""
    shown = _ip("-o", "-4", "addr")
    taken = [ipaddress.IPv4Interface(field).network for field in shown.split() if "/" in field]
    networks = list(_POOL.subnets(new_prefix=30))
    for network in random.sample(networks, 64):
        if not any(network.overlaps(other) for other in taken):
            return network
    raise OSError(f"no free /30 in {_POOL}")


@contextlib.contextmanager
def separate_host() -> Iterator[Host]:
    """A namespace joined to this one by a veth pair, removed on exit (with anything
    the test left in it). Raises OSError, saying what failed, if one cannot be made."""
    tag = uuid.uuid4().hex[:8]
    network = _free_network()
    ours, theirs = (str(address) for address in list(network.hosts())[:2])
    host = Host(f"imgsvc-{tag}", f"ivo{tag}", f"ivi{tag}", ours, theirs, str(network))
    prefix = f"/{network.prefixlen}"
    try:
        _ip("netns", "add", host.namespace)
        _ip("link", "add", host.outer, "type", "veth", "peer", "name", host.inner)
        _ip("link", "set", "dev", host.inner, "netns", host.namespace)
        _ip("addr", "add", host.address + prefix, "dev", host.outer)
        _ip("link", "set", "dev", host.outer, "up")
        _ip("-n", host.namespace, "addr", "add", host.peer + prefix, "dev", host.inner)
        _ip("-n", host.namespace, "link", "set", "dev", host.inner, "up")
        _ip("-n", host.namespace, "link", "set", "dev", "lo", "up")
        yield host
    finally:
        for args in (("link", "del", host.outer), ("netns", "del", host.namespace)):
            _ip(*args, check=False)
