"""`python -m launcher.agent ARGS`: torchrun (torch.distributed.run) itself, with the same arguments
and behaviour, minus the interpreter's teardown once it has finished: with torch loaded that costs
1-2 s at every run's end (measured on 2 CPUs), after the ranks have exited and everything is written.
A failure (an exception out of torchrun, e.g. a rank failed or a signal) leaves as torchrun leaves.

On a multi-node rendezvous it first settles this node's own address, which torch would guess from the
node's name; where that name resolves to a loopback address (Debian writes `127.0.1.1 NAME`, some
images `127.0.0.1 NAME`) the guesses reach nothing the other nodes can use:
- `--local-addr auto` becomes the address this node reaches the rendezvous endpoint from (the kernel's
  route). The rendezvous' rank 0 publishes it as MASTER_ADDR; torch's own choice, socket.getfqdn(),
  is "localhost" where the name shares 127.0.0.1 with localhost.
- GLOO_SOCKET_IFNAME, when unset, becomes the interface holding that address: gloo (the CPU ranks, and
  GPU runs' gloo groups) binds what the node's name resolves to, and would offer 127.0.1.1 to the
  other nodes. NCCL chooses its interfaces itself.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import MutableMapping

from launcher.plan.torchrun import LOCAL_ADDR_AUTO

_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def _value(argv: list[str], *names: str) -> tuple[int, str] | None:
    """(index, value) of an option given as `NAME VALUE` or `NAME=VALUE`, before the script's own arguments."""
    own = argv[: argv.index("-m")] if "-m" in argv else argv
    for i, arg in enumerate(own):
        if arg in names and i + 1 < len(own):
            return i + 1, own[i + 1]
        name, sep, value = arg.partition("=")
        if sep and name in names:
            return i, value
    return None


def source_address(host: str, port: int) -> str | None:
    """The address this machine sends from to reach host (a UDP connect picks the route, sends nothing);
    None when host does not resolve or only a loopback address would reach it."""
    try:
        family, kind, proto, _, target = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.connect(target)
            address = str(sock.getsockname()[0])
    except OSError:
        return None
    return None if ipaddress.ip_address(address).is_loopback else address


def interface_of(address: str) -> str | None:
    """The network interface that holds an IPv4 address (gloo takes an interface name), or None."""
    import fcntl
    import struct

    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                answer = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
        if socket.inet_ntoa(answer[20:24]) == address:
            return name
    return None


def own_name_address() -> str | None:
    """The first address this node's own name resolves to (what gloo binds), or None."""
    try:
        return str(socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)[0][4][0])
    except (OSError, IndexError):
        return None


def settle_node_address(argv: list[str], env: MutableMapping[str, str]) -> list[str]:
    """The argv with `--local-addr auto` resolved (dropped when nothing resolves: torch's default);
    GLOO_SOCKET_IFNAME set in env where this node's name resolves to a loopback address."""
    endpoint = _value(argv, "--rdzv_endpoint", "--rdzv-endpoint")
    auto = _value(argv, "--local-addr", "--local_addr")
    if endpoint is None or "--standalone" in argv:
        return argv
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    host, port = parse_rendezvous_endpoint(endpoint[1], default_port=29400)
    address = source_address(host, port)
    argv = list(argv)
    if auto is not None and auto[1] == LOCAL_ADDR_AUTO:
        index = auto[0]
        if address:
            argv[index] = address if argv[index] == LOCAL_ADDR_AUTO else f"{argv[index].split('=', 1)[0]}={address}"
        else:
            del argv[index - (argv[index] == LOCAL_ADDR_AUTO) : index + 1]
    own = own_name_address()
    if address and not env.get("GLOO_SOCKET_IFNAME") and (own is None or ipaddress.ip_address(own).is_loopback):
        interface = interface_of(address)
        if interface:
            env["GLOO_SOCKET_IFNAME"] = interface
            print(
                f"launcher.agent: {socket.gethostname()} resolves to {own or 'nothing'} here; gloo binds {interface} ({address}), "
                f"the interface this node reaches the rendezvous at {host} from (set GLOO_SOCKET_IFNAME to choose)",
                file=sys.stderr,
                flush=True,
            )
    return argv


def main() -> None:
    from torch.distributed.run import main as torchrun

    from launcher.versions import torchrun_flags_missing

    argv = sys.argv[1:]
    missing = torchrun_flags_missing(argv)
    if missing:  # one line per node, before any rank starts (argparse would print its usage, then fail)
        import torch

        print(
            f"error: torch {torch.__version__} on {socket.gethostname()} ({sys.executable}): its torchrun has no "
            f"{', '.join(missing)}, which this plan uses; install the torch the run was planned with (plan.json's versions) "
            "on every node",
            file=sys.stderr,
            flush=True,
        )
        os._exit(2)
    argv = settle_node_address(argv, os.environ)
    try:
        torchrun(argv)
        code = 0
    except SystemExit as exc:  # argparse and torchrun's own exits
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code != 0:
            raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
