"""The options of ``pytunnel serve`` and ``pytunnel connect``: defaults and validation come
from the library's config classes, in-process (no subprocess: nothing here runs a tunnel)."""

from __future__ import annotations

import inspect
import os
from typing import Any

import attrs
import click
import pytest
from click.testing import CliRunner

import pytunnel
from pytunnel.cli import main

#: Options whose config field is not named like the option: option -> (config class, field).
_RENAMED: dict[str, dict[str, tuple[type[Any], str]]] = {
    "serve": {
        "max_session_streams": (pytunnel.SessionConfig, "max_streams"),
        "max_frame_size": (pytunnel.SessionConfig, "max_frame_size"),
        "receive_budget": (pytunnel.SessionConfig, "receive_budget"),
    },
    "connect": {
        "max_streams": (pytunnel.SessionConfig, "max_streams"),
        "receive_budget": (pytunnel.SessionConfig, "receive_budget"),
        "tls_server_name": (pytunnel.ClientConfig, "tls_server_hostname"),
        "header": (pytunnel.ClientConfig, "ws_headers"),
        "host_header": (pytunnel.ClientConfig, "ws_host"),
    },
}
#: Options with no default in any config class: where the value comes from is the CLI's own
#: business (files, flags that build a TLS context, forwards, output).
_CLI_ONLY = {
    "serve": {
        "listen",  # checked against serve()'s own parameters below
        "http_listen",  # serve()'s own parameters, both None
        "https_listen",
        "token",
        "token_file",
        "tls_cert",
        "tls_key",
        "tls_self_signed",
        "tls_dir",
        "tls_client_ca",
        "log_level",
        "log_format",
        "metrics",
        "admin",
        "admin_token_file",
        "node_id",  # these three build the registry given as ServerConfig.cluster
        "node_address",
        "cluster_lease_ttl",  # EtcdRegistry(lease_ttl=), default DEFAULT_LEASE_TTL
        "cluster_secret_file",  # read into ServerConfig.cluster_secret
        "cluster_tls_ca",  # builds ServerConfig.cluster_tls, as tls_cert builds tls
        "cluster_ca",  # these five build the EtcdRegistry's TLS context and credentials
        "cluster_cert",
        "cluster_key",
        "cluster_user",
        "cluster_password_file",
    },
    "connect": {
        "server",
        "token",
        "token_file",
        "limit",  # per forward: Tunnel.forward_*(limit=)
        "proxy_protocol",  # per remote forward: Tunnel.forward_remote(proxy_protocol=)
        "group",  # per remote forward: Tunnel.forward_remote(group=, group_key=)
        "group_key_file",
        "forwarded_headers",  # per name route: Tunnel.forward_name(forwarded_headers=)
        "rewrite_host",
        "basic_auth",
        "dynamic",
        "socks_auth",
        "use_tls",
        "tls_ca",
        "tls_cert",
        "tls_key",
        "remote",
        "local",
        "status_interval",
        "stdio",  # one connection instead of forwards: Tunnel.open_stream + relay_stdio
        "log_level",
        "log_format",
        "metrics",
        "admin",
        "admin_token_file",
        "quiet",
    },
}
#: Config defaults an option cannot hold as such, and how it spells them instead.
_SPELLED: dict[str, dict[Any, Any]] = {"max_attempts": {None: 0}}
_CONFIG = {"serve": pytunnel.ServerConfig, "connect": pytunnel.ClientConfig}
_ARGS = {"serve": [], "connect": ["127.0.0.1:7000"]}


def _command(name: str) -> click.Command:
    """A command of the group, imported if it was not yet (the group is lazy)."""
    command = main.get_command(click.Context(main), name)
    assert command is not None, name
    return command


def _field_default(config: type[Any], name: str) -> Any:
    """The value a config built with no arguments but the required token holds."""
    required = {"token": "t"} if "token" in attrs.fields_dict(config) else {}
    return getattr(config(**required), name)


def _parsed_defaults(command: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the command's body receives when no option is given: defaults after their types
    and callbacks, as the config is built from them."""
    for name in list(os.environ):
        if name.startswith("PYTUNNEL_"):
            monkeypatch.delenv(name)
    assert isinstance(main, click.Group)
    cmd = _command(command)
    with cmd.make_context(command, list(_ARGS[command])) as ctx:
        return dict(ctx.params)


@pytest.mark.parametrize("command", ["serve", "connect"])
def test_every_option_default_is_the_config_default(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each option that sets a config field shows (and applies) that field's default; an
    option that maps to no field must be declared CLI-only here, so a new option is
    classified rather than given a retyped default."""
    checked = []
    for name, value in _parsed_defaults(command, monkeypatch).items():
        if name in _CLI_ONLY[command]:
            continue
        config, field = _RENAMED[command].get(name, (_CONFIG[command], name))
        assert field in attrs.fields_dict(config), f"--{name} maps to no config field"
        expected = _field_default(config, field)
        expected = _SPELLED.get(name, {}).get(expected, expected)
        assert value == expected, f"{command} --{name}: {value!r} != {config.__name__}.{field}"
        checked.append(name)
    assert len(checked) >= 10  # the walk found the options at all


def test_listen_default_is_serves_own(monkeypatch: pytest.MonkeyPatch) -> None:
    parameters = inspect.signature(pytunnel.serve).parameters
    listen = _parsed_defaults("serve", monkeypatch)["listen"]
    assert listen == (parameters["host"].default, parameters["port"].default)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (
            ["connect", "127.0.0.1:7000", "--tls-fingerprint", "SHA256:not*base64"],
            "--tls-fingerprint",
        ),
        (["connect", "127.0.0.1:7000", "--client-id", "bad id"], "--client-id"),
        (["connect", "127.0.0.1:7000", "--client-id", "x" * 65], "--client-id"),
        (["connect", "127.0.0.1:7000", "--socks-auth", ":password"], "--socks-auth"),
        (["connect", "127.0.0.1:7000", "--socks-auth", "user"], "--socks-auth"),
    ],
)
def test_config_field_rules_are_usage_errors_naming_the_option(
    args: list[str], option: str
) -> None:
    result = CliRunner().invoke(main, [*args, "--token", "t"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for" in result.output
    assert option in result.output


def test_out_of_range_config_value_is_a_usage_error() -> None:
    """A value no option type rules out but the config class refuses (a frame limit past
    2**32 - 1) is one usage error, not a traceback from inside the running command."""
    result = CliRunner().invoke(
        main, ["serve", "--listen", "127.0.0.1:0", "--max-frame-size", str(2**32)]
    )
    assert result.exit_code == 2, result.output
    assert "Usage:" in result.output
    assert "max_frame_size" in result.output


def test_server_port_zero_is_a_usage_error() -> None:
    """Port 0 means "any free port" to listen on; as the server to connect to it is a bad
    argument (status 2), not a connection attempt that fails later."""
    result = CliRunner().invoke(main, ["connect", "127.0.0.1:0", "--token", "t"])
    assert result.exit_code == 2, result.output
    assert "out of range 1-65535" in result.output
    assert isinstance(main, click.Group)
    with _command("serve").make_context("serve", ["--listen", "127.0.0.1:0"]) as ctx:
        assert ctx.params["listen"] == ("127.0.0.1", 0)


@pytest.mark.parametrize("command", ["serve", "connect"])
def test_receive_budget_reaches_the_session_config(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--receive-budget`` on either command is the sessions' ``receive_budget``."""
    from pytunnel.cli._connect import client_config
    from pytunnel.cli._serve import server_config

    for name in list(os.environ):
        if name.startswith("PYTUNNEL_"):
            monkeypatch.delenv(name)
    assert isinstance(main, click.Group)
    args = [*_ARGS[command], "--receive-budget", "1048576"]
    with _command(command).make_context(command, args) as ctx:
        build = server_config if command == "serve" else client_config
        config = build(ctx.params, "secret")
    assert config.session.receive_budget == 1048576
    result = CliRunner().invoke(main, [command, *_ARGS[command], "--receive-budget", "0"])
    assert result.exit_code == 2
    assert "--receive-budget" in result.output
