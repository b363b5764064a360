"""launcher.agent settles a node's own address before torchrun: `--local-addr auto` becomes the address
the node reaches the rendezvous endpoint from, and gloo is bound to its interface where the node's own
name resolves to a loopback address (tests/slurm/test_rendezvous.py runs it on two nodes)."""

from __future__ import annotations

import fcntl
import socket
import struct

import pytest

from launcher import agent


def _an_address() -> tuple[str, str]:
    """(interface, address) of a non-loopback IPv4 interface of this machine."""
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                address = socket.inet_ntoa(fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))[20:24])
            except OSError:
                continue
        if not address.startswith("127."):
            return name, address
    pytest.skip("no non-loopback IPv4 interface here")


RDZV = ["--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_id", "x", "--rdzv_conf", "is_host=1"]
SCRIPT = ["--nproc_per_node", "1", "-m", "launcher.runtime", "--plan", "p.json", "--local-addr", "auto"]


def test_local_addr_auto_becomes_the_address_toward_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    interface, address = _an_address()
    monkeypatch.setattr(agent, "own_name_address", lambda: "192.0.2.99")  # a name that resolves to a real address
    env: dict[str, str] = {}
    argv = agent.settle_node_address(["--rdzv_endpoint", f"{address}:29500", *RDZV, "--local-addr", "auto", *SCRIPT], env)
    assert argv == ["--rdzv_endpoint", f"{address}:29500", *RDZV, "--local-addr", address, *SCRIPT]  # the script's own untouched
    assert env == {}  # gloo finds its address by the node's name
    argv = agent.settle_node_address([f"--rdzv-endpoint={address}:29500", "--local_addr=auto", *SCRIPT], env)
    assert argv[:2] == [f"--rdzv-endpoint={address}:29500", f"--local_addr={address}"]
    assert agent.interface_of(address) == interface


def test_gloo_is_bound_to_that_interface_where_the_name_is_loopback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    interface, address = _an_address()
    monkeypatch.setattr(agent, "own_name_address", lambda: "127.0.1.1")
    env: dict[str, str] = {}
    agent.settle_node_address(["--rdzv_endpoint", f"{address}:29500", *RDZV, "--local-addr", "auto", *SCRIPT], env)
    assert env == {"GLOO_SOCKET_IFNAME": interface}
    assert f"resolves to 127.0.1.1 here; gloo binds {interface} ({address})" in capsys.readouterr().err
    chosen = {"GLOO_SOCKET_IFNAME": "ib0"}  # the user's choice stands
    agent.settle_node_address(["--rdzv_endpoint", f"{address}:29500", *RDZV], chosen)
    assert chosen == {"GLOO_SOCKET_IFNAME": "ib0"}


def test_nothing_changes_on_one_node_or_without_a_route() -> None:
    standalone = ["--standalone", "--nnodes", "1", *SCRIPT]
    assert agent.settle_node_address(standalone, {}) == standalone
    env: dict[str, str] = {}
    # An endpoint that does not resolve: torch's own choice (socket.getfqdn()) then, and its error.
    argv = agent.settle_node_address(["--rdzv_endpoint", "no-such-host.invalid:29500", *RDZV, "--local-addr", "auto", *SCRIPT], env)
    assert argv == ["--rdzv_endpoint", "no-such-host.invalid:29500", *RDZV, *SCRIPT] and env == {}
    # Only a loopback address reaches it (every agent on this machine): nothing to settle either.
    argv = agent.settle_node_address(["--rdzv_endpoint", "127.0.0.1:29500", *RDZV, "--local-addr", "auto", *SCRIPT], env)
    assert argv == ["--rdzv_endpoint", "127.0.0.1:29500", *RDZV, *SCRIPT] and env == {}
