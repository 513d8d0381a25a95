"""The %zchat magics in a real IPython shell (no kernel), against real ZEO servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import zchat_nb
from zchat_nb.net import format_address

from .helpers import MakeClient

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
    zchat(ip, "reply 1 @ada welcome")
    zchat(ip, "edit 2 it is `print('code')`")
    zchat(ip, "delete 3")
    zchat(ip, "history -n 5")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("  1  ") and lines[-1].endswith("ada ↪: @ada welcome")
    assert lines[1].endswith("it is `print('code')` (edited)") and lines[2].endswith("ada: (message deleted)")
    zchat(ip, "history --mentions")
    assert capsys.readouterr().out.splitlines() == [lines[-1].replace("  4  ", "  1  ")]
    with pytest.raises(UsageError, match="no message 7; N is a number shown by the last `%zchat history`"):
        zchat(ip, "delete 7")
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


@integration
def test_history_and_rooms_show_what_others_typed_but_do_not_obey_it(
    ip: InteractiveShell, server: zchat_nb.Server, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """Control characters that another client sent are shown as U+FFFD, not run by the terminal."""
    eve = make_client(server.address, "eve\r[12:00] teacher")
    eve.session("lab").add_message("\x1b[2J\x1b]52;c;ZXZpbA==\x07 wiped")
    eve.session("\x1b[8mhidden\rlab").add_message("a room named by eve")  # before ada connects: she sees it
    zchat(ip, f"join {format_address(server.address)} --name ada --room lab")
    capsys.readouterr()
    zchat(ip, "history")
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert "eve\ufffd[12:00] teacher: \ufffd[2J\ufffd]52;c;ZXZpbA==\ufffd wiped" in out
    zchat(ip, "rooms")
    assert capsys.readouterr().out.splitlines() == ["\ufffd[8mhidden\ufffdlab", "lab  <- joined"]
    zchat(ip, "leave")


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


def test_paste_fills_the_next_cell_with_a_code_block_and_never_runs_it(
    ip: InteractiveShell, server: zchat_nb.Server, capsys: pytest.CaptureFixture[str]
) -> None:
    host, port = server.address
    zchat(ip, f"join {host}:{port} --name ada --room paste")
    ip.rl_next_input = None
    with pytest.raises(UsageError, match="none of the last 0 messages of 'paste' has a code block"):
        zchat(ip, "paste")
    zchat(ip, "send", "pasted_first = 1\n")  # sent as a ```python block
    zchat(ip, "send --raw", "two blocks:\n```\npasted_a = 1\n```\nand\n```\npasted_b = 2\n```\n")
    zchat(ip, 'send "just words, no code"')

    zchat(ip, "paste")  # the latest code block: the last block of the latest message that has one
    assert ip.rl_next_input == "pasted_b = 2"
    assert "is in the next cell" in capsys.readouterr().out

    zchat(ip, "history -n 10")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("  1  [") and lines[0].endswith("ada: ```python")
    numbered = [line for line in lines if line[:3].strip().isdigit()]
    assert [line[:3].strip() for line in numbered] == ["1", "2", "3"]
    zchat(ip, "paste 1")
    assert ip.rl_next_input == "pasted_first = 1"
    zchat(ip, "paste 2")  # every block of message 2
    assert ip.rl_next_input == "pasted_a = 1\npasted_b = 2"
    with pytest.raises(UsageError, match="message 3 \\(ada\\) has no code block"):
        zchat(ip, "paste 3")
    with pytest.raises(
        UsageError, match=r"no message 4; N is a number shown by the last `%zchat history` \(1 to 3\)"
    ):
        zchat(ip, "paste 4")
    # Filled, never run: none of the pasted assignments happened.
    assert not {"pasted_first", "pasted_a", "pasted_b"} & set(ip.user_ns)


def test_paste_n_needs_a_history_first(ip: InteractiveShell, server: zchat_nb.Server) -> None:
    host, port = server.address
    zchat(ip, f"join {host}:{port} --name ada --room paste-n")
    with pytest.raises(UsageError, match="run `%zchat history` first"):
        zchat(ip, "paste 1")


def test_share_sends_a_variable_as_an_attachment(
    ip: InteractiveShell, server: zchat_nb.Server, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    host, port = server.address
    zchat(ip, f"join {host}:{port} --name ada --room share")
    figure = Figure(figsize=(2, 1))
    figure.add_subplot().plot([1, 3, 2])
    ip.user_ns["fig"] = figure
    zchat(ip, "share fig my first plot")
    assert "Shared figure.png (image/png, " in capsys.readouterr().out
    reader = zchat_nb.connect(server.address, user="reader")
    try:
        (message,) = reader.session("share").history(5)
        assert message.text == "my first plot" and message.attachments[0].mime == "image/png"
        assert reader.attachment_bytes(message).startswith(b"\x89PNG")
    finally:
        reader.close()
    with pytest.raises(UsageError, match="there is no variable 'nothing' in this kernel"):
        zchat(ip, "share nothing")
    ip.user_ns["words"] = b"just some bytes"
    with pytest.raises(UsageError, match="%zchat share: the data is not a PNG, JPEG, GIF or WebP image"):
        zchat(ip, "share words")
