"""A server that is connected but does not answer reads (stalled, or hostile): every call still ends.

ZEO waits for the answer to a load for ever; a client of ours waits at most its ``timeout`` and
raises :class:`ZChatDisconnected` naming the server, and reads on, nothing skipped and nothing
repeated, once the server answers again or after a reconnect. The server here is a real one behind
:class:`tests.attacks.SilentProxy`, which passes everything but the answers to loads. Each call runs
in a thread with a deadline (:func:`tests.attacks.finishes`): a hang fails the test, not the suite.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import zchat_nb
from zchat_nb import ChatClient, ZChatDisconnected, ZChatSendError

from .attacks import SilentProxy, finishes, honest_pair_works
from .test_exceptions import _PNG as PNG
from .test_exceptions import READS, WRITES
from .test_widget import comms, hello, recorder, texts  # noqa: F401 (comms: a fixture)

pytestmark = pytest.mark.integration

#: The client's timeout: how long a read waits for an answer.
TIMEOUT = 1.0
#: Generous: only a call that hangs goes past it.
DEADLINE = 60.0


@pytest.fixture
def server() -> Iterator[zchat_nb.Server]:
    """A hardened server whose room 'lab' has messages."""
    with zchat_nb.serve() as srv:
        with zchat_nb.connect(srv.address, user="ada") as writer:
            lab = writer.session("lab")
            for text in ("one", "two"):
                lab.add_message(text)
            lab.heartbeat()
        yield srv


@pytest.fixture
def proxy(server: zchat_nb.Server) -> Iterator[SilentProxy]:
    with SilentProxy(server.address) as silent:
        yield silent


@pytest.fixture
def silent(proxy: SilentProxy) -> Iterator[ChatClient]:
    """A client (nothing of the chat in its caches) whose server has stopped answering reads."""
    client = zchat_nb.connect(proxy.address, user="bob", timeout=TIMEOUT)
    proxy.holding.set()
    try:
        yield client
    finally:
        client.close()


#: Every read of test_exceptions' table but pack (it reads nothing) and attachments (tested below).
SILENT_READS = {
    name: call for name, call in READS.items() if name not in ("teacher.pack", "ChatClient.attachment_bytes")
}


@pytest.mark.parametrize("call", list(SILENT_READS), ids=list(SILENT_READS))
def test_a_read_the_server_does_not_answer_raises_zchat_disconnected(
    silent: ChatClient, proxy: SilentProxy, call: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ZChatDisconnected) as info:
        finishes(lambda: SILENT_READS[call](silent), DEADLINE)
    assert proxy.held(), "the read was answered: nothing was tested"
    message = str(info.value)
    assert f"the server at {silent.address_text} did not answer within {TIMEOUT:g} s" in message
    assert f"zchat-nb serve --port {silent.address[1]} --path FILE" in message
    assert _load_tracebacks(caplog) == []


@pytest.mark.parametrize("call", list(WRITES), ids=list(WRITES))
def test_a_write_whose_reads_the_server_does_not_answer_fails_in_time(
    silent: ChatClient, proxy: SilentProxy, call: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ZChatSendError) as info:
        finishes(lambda: WRITES[call](silent), DEADLINE)
    assert silent.address_text in str(info.value)
    assert _load_tracebacks(caplog) == []


def _load_tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What ZODB logged, as warnings or errors, of the loads the server left unanswered.

    ZODB logs every failed load as an ERROR with its traceback before it raises; the caller is told
    in words already, and in a notebook each traceback would be printed under the cell (Python's
    last-resort handler). Such records are demoted to DEBUG.
    """
    return [
        r.getMessage() for r in caplog.records if r.name == "ZODB.Connection" and r.levelno >= logging.WARNING
    ]


@pytest.mark.parametrize("methods", [("loadBefore",), ("sendBlob",)])
def test_an_attachment_the_server_does_not_send_raises_zchat_disconnected(
    server: zchat_nb.Server, methods: tuple[str, ...]
) -> None:
    with zchat_nb.connect(server.address, user="ada") as ada:
        ada.session("pictures").share(PNG, "a picture")
    with (
        SilentProxy(server.address, methods) as proxy,
        zchat_nb.connect(proxy.address, user="bob", timeout=TIMEOUT) as bob,
    ):
        (shared,) = bob.session("pictures").new_messages()
        bob.db.cacheMinimize()  # the blob's record is loaded again
        proxy.holding.set()
        with pytest.raises(ZChatDisconnected, match="did not answer within"):
            finishes(lambda: bob.attachment_bytes(shared), DEADLINE)
        assert proxy.held()
        proxy.release()
        assert finishes(lambda: bob.attachment_bytes(shared), DEADLINE) == PNG


def read_texts(read: Callable[[], list[Any]]) -> list[str]:
    return [m.text for m in finishes(read, DEADLINE)]


@pytest.mark.parametrize("recovery", ["late answers", "reconnect"])
def test_the_reader_goes_on_once_the_server_answers_nothing_skipped_or_repeated(
    server: zchat_nb.Server, proxy: SilentProxy, recovery: str
) -> None:
    with (
        zchat_nb.connect(server.address, user="alice") as alice,
        zchat_nb.connect(proxy.address, user="bob", timeout=TIMEOUT) as bob,
    ):
        writer = alice.session("lab")
        reader = bob.session("lab")
        assert read_texts(reader.new_messages) == ["one", "two"]
        proxy.holding.set()
        heard = bob.generation()
        writer.add_message("three")
        assert bob.wait_for_change(heard, DEADLINE)  # the invalidation reaches bob; the new state does not
        with pytest.raises(ZChatDisconnected):
            finishes(reader.new_messages, DEADLINE)
        with pytest.raises(ZChatDisconnected):
            finishes(lambda: reader.history(10), DEADLINE)
        writer.add_message("four")
        with pytest.raises(ZChatDisconnected):
            finishes(lambda: reader.new_messages(timeout=TIMEOUT), DEADLINE)
        if recovery == "late answers":
            proxy.release()  # a stalled server that wakes up
        else:
            back = threading.Event()
            unsubscribe = bob.subscribe(lambda event: back.set() if event.kind == "connected" else None)
            proxy.cut()  # the kept answers are lost; ZEO reconnects through the proxy
            assert back.wait(DEADLINE), "bob did not reconnect"
            unsubscribe()
        got = read_texts(lambda: reader.new_messages(timeout=DEADLINE))
        got += read_texts(reader.new_messages)
        assert got == ["three", "four"]
        writer.add_message("five")
        assert read_texts(lambda: reader.new_messages(timeout=DEADLINE)) == ["five"]
        assert read_texts(reader.new_messages) == []
        assert [m.text for m in reader.history(10)] == ["one", "two", "three", "four", "five"]
        assert not reader.skipped
    honest_pair_works(proxy.address)


@pytest.mark.usefixtures("comms")
def test_the_widget_says_the_server_does_not_answer_then_shows_what_it_missed(
    server: zchat_nb.Server, proxy: SilentProxy
) -> None:
    from zchat_nb.widget import ChatWidget

    with (
        zchat_nb.connect(server.address, user="alice") as alice,
        zchat_nb.connect(proxy.address, user="bob", timeout=TIMEOUT) as bob,
    ):
        widget = ChatWidget(bob, "lab", poll_interval=0.2)
        try:
            rec = recorder(widget)
            hello(widget)
            proxy.holding.set()
            start = rec.mark()
            alice.session("lab").add_message("three")
            rec.wait_state("status_text", lambda text: "did not answer within" in text, start, DEADLINE)
            proxy.release()
            appended = rec.wait_for(lambda m: m["type"] == "append", start, DEADLINE)
            assert len(texts(appended)) == 1 and "three" in texts(appended)[0]
        finally:
            widget.close()


@pytest.mark.usefixtures("comms")
def test_a_widget_whose_first_read_failed_reads_again_by_itself(
    server: zchat_nb.Server, proxy: SilentProxy
) -> None:
    """Nothing changes in the room after the failure: only the poller's own retry can load it."""
    from zchat_nb.widget import ChatWidget

    with zchat_nb.connect(proxy.address, user="bob", timeout=TIMEOUT) as bob:
        bob.db.storage._cache.clear()  # the room's objects come from the server
        proxy.holding.set()
        widget = ChatWidget(bob, "lab")
        try:
            rec = recorder(widget)
            rec.wait_state("status_text", lambda text: "did not answer within" in text, 0, DEADLINE)
            start = rec.mark()
            proxy.release()
            rec.wait_state("status_text", lambda text: "did not answer" not in text, start, DEADLINE)
            assert texts(hello(widget)) == ["<p>one</p>", "<p>two</p>"]
        finally:
            widget.close()


@pytest.mark.parametrize("methods", [("loadBefore",), ("vote",)], ids=["a load", "the vote"])
def test_a_send_ends_within_its_own_timeout_even_when_answers_may_take_longer(
    server: zchat_nb.Server, methods: tuple[str, ...]
) -> None:
    """The send's deadline cuts each wait for an answer short: a send with a 1 s timeout on a
    client that waits 30 s for an answer fails after about 1 s, not 30 (nor 1 + 30)."""
    with (
        SilentProxy(server.address, methods) as proxy,
        zchat_nb.connect(proxy.address, user="bob", timeout=30.0) as bob,
    ):
        lab = bob.session("lab")
        lab.new_messages()
        bob.policy = dataclasses.replace(bob.policy, timeout=1.0)
        bob.db.cacheMinimize()  # the send loads its objects from the server again
        bob.db.storage._cache.clear()
        proxy.holding.set()
        started = time.monotonic()
        with pytest.raises(ZChatSendError, match="within 1 s"):
            finishes(lambda: lab.add_message("in time"), DEADLINE)
        took = time.monotonic() - started
        assert proxy.held(), "the server answered everything: nothing was tested"
        assert took < 15.0, f"the send took {took:.1f} s: it waited for the 30 s answer timeout"
        proxy.release()
        # Aborted, not half-sent: once the server answers again nothing of it is there.
        assert "in time" not in read_texts(lab.new_messages)


def test_a_send_whose_finish_is_not_answered_ends_in_time_and_its_retry_stores_it_once(
    server: zchat_nb.Server,
) -> None:
    """A server that stalls after the vote: the commit happened, its answer does not come. ZEO
    waits for that answer for ever; the send gives up after the client's answer timeout and says so."""
    with (
        SilentProxy(server.address, ("tpc_finish",)) as proxy,
        zchat_nb.connect(proxy.address, user="bob", timeout=TIMEOUT) as bob,
    ):
        lab = bob.session("lab")
        lab.new_messages()
        bob.policy = dataclasses.replace(bob.policy, timeout=1.0)
        draft = lab.draft("its answer is lost")
        proxy.holding.set()
        with pytest.raises(ZChatSendError, match="may have been sent"):
            finishes(lambda: lab.post(draft), DEADLINE)  # ZEO alone: it hangs
        assert proxy.held(), "the server answered the finish: nothing was tested"
        proxy.release()
        bob.policy = dataclasses.replace(bob.policy, timeout=30.0)
        assert finishes(lambda: lab.post(draft), DEADLINE).id == draft.id  # reconnected: the retry
        assert read_texts(lab.new_messages).count("its answer is lost") == 1
        assert [m.text for m in lab.history(5)].count("its answer is lost") == 1
    honest_pair_works(server.address)
