"""The %zchat magics in a real IPython shell (no kernel), against real ZEO servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import zchat_nb

integration = pytest.mark.integration


@pytest.fixture
def ip() -> Iterator[InteractiveShell]:
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "zchat_nb")
    yield shell
    shell.run_line_magic("unload_ext", "zchat_nb")


def zchat(ip: InteractiveShell, line: str, cell: str | None = None) -> object:
    if cell is None:
        return ip.run_line_magic("zchat", line)
    return ip.run_cell_magic("zchat", line, cell)


@pytest.mark.parametrize("line", ["", "--help", "help"])
def test_usage_lists_every_command(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str], line: str
) -> None:
    zchat(ip, line)
    out = capsys.readouterr().out
    for command in ["serve", "join", "send", "history", "rooms", "status", "leave", "stop", "inspect"]:
        assert f"%zchat {command}" in out
    assert "%%zchat send" in out


def test_readme_shows_each_command_as_its_parser_does() -> None:
    """The commands are declared once, in the parsers; the README's table must follow them."""
    from zchat_nb.magics import _parsers, synopsis

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for parser in _parsers().values():
        assert f"`{synopsis(parser)}`" in readme


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("frobnicate", "unknown command 'frobnicate'"),
        ("send hello", "run `%zchat join` first"),
        ("history", "run `%zchat join` first"),
        ("stop", "started no server; stop the local default one with `zchat-nb stop`"),
        ("history -n many", "invalid int value: 'many'"),
        ('rooms "unterminated', "cannot parse"),
        ("join nowhere:xx", "bad server address 'nowhere:xx'"),
    ],
)
def test_mistakes_raise_usage_errors_that_name_the_fix(ip: InteractiveShell, line: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        zchat(ip, line)


def test_command_help_does_not_run_the_command(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    zchat(ip, "serve --help")
    assert "--port" in capsys.readouterr().out
    with pytest.raises(UsageError, match="started no server"):
        zchat(ip, "stop")


@integration
def test_serve_join_send_history_rooms_status_leave_stop(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    zchat(ip, "serve")
    out = capsys.readouterr().out
    assert "%zchat join 127.0.0.1:" in out
    zchat(ip, "join --name ada --room lab")
    zchat(ip, 'send "hello from the magic"')
    zchat(ip, "send", "print('code')\n")
    zchat(ip, "send --raw", "*as typed*\n")
    capsys.readouterr()
    zchat(ip, "history -n 5")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("ada: hello from the magic")
    assert "```python" in lines[1] and "print('code')" in lines[2]
    assert lines[-1].endswith("ada: *as typed*")
    zchat(ip, "inspect")
    from zchat_nb import magics
    from zchat_nb.inspector import Inspector

    assert magics._magics is not None
    assert any(isinstance(w, Inspector) for w in magics._magics.widgets)
    zchat(ip, "rooms")
    assert "lab  <- joined" in capsys.readouterr().out
    zchat(ip, "status")
    status = capsys.readouterr().out
    assert "connected to 127.0.0.1:" in status and "'ada'" in status and "'lab'" in status
    with pytest.raises(UsageError, match="only `%%zchat send` takes a cell body"):
        zchat(ip, "history", "body")
    with pytest.raises(UsageError, match="the cell is empty"):
        zchat(ip, "send", "   \n")
    zchat(ip, "leave")
    assert "Left the chat." in capsys.readouterr().out
    zchat(ip, "stop")
    assert "Server stopped." in capsys.readouterr().out


def test_config_traitlets(ip: InteractiveShell) -> None:
    ip.run_line_magic("config", "ZChat.poll_interval = 0.25")
    ip.run_line_magic("config", "ZChat.user = 'grace'")
    from zchat_nb import magics

    assert magics._magics is not None
    assert magics._magics.settings.poll_interval == 0.25
    assert magics._magics.settings.user == "grace"


def test_default_user_comes_from_jupyterhub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZCHAT_USER", raising=False)
    monkeypatch.setenv("JUPYTERHUB_USER", "student7")
    assert zchat_nb.default_user() == "student7"


@integration
def test_too_long_a_message_is_a_usage_error(ip: InteractiveShell) -> None:
    zchat(ip, "serve")
    zchat(ip, "join --name ada")
    # A cell body, as IPython's $-expansion of a 70 kB line magic takes it 20 s.
    with pytest.raises(UsageError, match="over the 65536-byte limit"):
        zchat(ip, "send --raw", "x" * 70_000)


@integration
def test_serve_and_join_with_certificates(
    ip: InteractiveShell, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from zchat_nb import certs

    classroom = certs.make_classroom(tmp_path, students=["ada"])
    zchat(ip, f"serve --tls {classroom.directory}")
    assert "--tls FOLDER" in capsys.readouterr().out
    zchat(ip, f"join --tls {classroom.bundles['ada']}")  # no address: the server this kernel serves
    zchat(ip, "send over TLS")
    zchat(ip, "status")
    assert "as 'ada'" in capsys.readouterr().out
    zchat(ip, "leave")
    zchat(ip, "stop")


@integration
def test_unload_stops_every_widget_poller(ip: InteractiveShell, server: zchat_nb.Server) -> None:
    import threading

    before = threading.active_count()
    client = zchat_nb.connect(server.address, user="coder")
    from zchat_nb.widget import ChatWidget

    widget = ChatWidget(client, "general")  # made in code, not by %zchat join
    assert threading.active_count() > before
    ip.run_line_magic("unload_ext", "zchat_nb")
    assert widget.closed
    client.close()
    assert threading.active_count() == before
    ip.run_line_magic("load_ext", "zchat_nb")  # the fixture unloads it again
