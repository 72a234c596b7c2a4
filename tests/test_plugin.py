"""The pytest plugin, exercised the way users use it: a sample test file run by pytester."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SAMPLE = """
import functools

import pytest
import trio

import pytunnel


async def echo(stream):
    async for chunk in stream:
        await stream.send_all(chunk)


async def test_expose_a_local_service(pytunnel_expose, nursery):
    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    host, public_port = await pytunnel_expose("127.0.0.1", port)
    assert public_port != port
    stream = await trio.open_tcp_stream(host, public_port)
    await stream.send_all(b"through the tunnel")
    assert await stream.receive_some() == b"through the tunnel"
    await stream.aclose()


async def test_server_options_from_conftest(pytunnel_tunnel):
    with pytest.raises(pytunnel.TargetForbiddenError):
        await pytunnel_tunnel.open_stream("127.0.0.1", 9)


async def test_tunnel_is_connected(pytunnel_tunnel, pytunnel_server):
    assert pytunnel_tunnel.connected
    assert pytunnel_server.session_count == 1
"""

CONFTEST = """
import pytest


@pytest.fixture
def pytunnel_server_options():
    return {"permit_open": ["none"]}
"""


def test_plugin_fixtures_in_a_user_suite(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_user=SAMPLE)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_plugin_is_inert_unless_used(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_nothing():\n    assert True\n")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "pytunnel" not in result.stdout.str()


def test_forwards_left_open_are_torn_down(pytester: pytest.Pytester) -> None:
    """A forward the test never closes is closed by the fixture; the leak check passes."""
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(
        test_leak="""
import trio


async def test_leaks_a_forward_task(pytunnel_tunnel):
    # a forward started on the tunnel and never closed is closed by the fixture: no leak
    await pytunnel_tunnel.forward_local("127.0.0.1", 9)
"""
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


LEAKY = """
import pytest

import pytunnel
import pytunnel.testing.plugin


async def _does_not_close(self):
    pass


async def test_tunnel_that_outlives_its_close(pytunnel_tunnel, monkeypatch):
    # a Tunnel.aclose that returns without ending the tunnel's task: the leak it must catch
    monkeypatch.setattr(pytunnel.Tunnel, "aclose", _does_not_close)
    monkeypatch.setattr(pytunnel.testing.plugin, "LEAK_TIMEOUT", 0.5)


async def test_server_that_outlives_its_close(pytunnel_server, monkeypatch):
    monkeypatch.setattr(pytunnel.TunnelServer, "aclose", _does_not_close)
    monkeypatch.setattr(pytunnel.testing.plugin, "LEAK_TIMEOUT", 0.5)


async def test_closes_properly(pytunnel_tunnel):
    assert pytunnel_tunnel.connected
"""


def test_leak_check_fires_on_tasks_that_outlive_the_fixture(pytester: pytest.Pytester) -> None:
    """A fixture whose close leaves its task running fails the test with LeakError naming the
    task, and the task is cancelled, so the run goes on (the next test passes)."""
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_leaky=LEAKY)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "--timeout", "60")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 1, result.stdout.str()
    assert outcomes.get("failed", 0) + outcomes.get("errors", outcomes.get("error", 0)) == 2
    out = result.stdout.str()
    assert "LeakError: task(s) of the tunnel client outlived the test: " in out
    assert "LeakError: task(s) of the tunnel server outlived the test: " in out
    assert "Tunnel._run" in out
    assert "Timeout" not in out
