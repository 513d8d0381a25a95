"""ChatWidget: one chat room in a notebook, live through ZEO, drawn by a small anywidget view.

The data path, end to end::

    browser "send" --> sender thread: ChatSession.add_message() --> commit over ZEO
    server pushes the invalidation --> client.subscribe() wakes the poller
    poller thread: new_messages() --> render.message_payload() --> widget.send(Append(...).to_wire())

Threads (both daemons, both stopped and joined by :meth:`ChatWidget.close`):

``poller``
    Reads the shown room with its own :class:`~zchat_nb.model.ChatSession` (cursor in memory, its
    own ZODB connection), counts unread messages of the other rooms, refreshes the room list and
    the status line, and answers the views' requests. It is the only thread that sends messages to
    the browser. It sleeps until an invalidation, a commit of its client or a request wakes it: on a
    ZEO client nothing is read on a timer, and a wake-up reads only what the server said changed
    (an in-process storage tells nobody of commits: then it also reads every ``poll_interval``).
``sender``
    Commits what the user sends, so that the kernel never waits for ZEO (a send to a server that
    is away takes up to the client's ``timeout``). Its outcome goes back through the poller. It
    also commits presence: a join when a room is shown, a leave when it no longer is, and a lease
    renewal every ``heartbeat_interval`` seconds (rare: each one makes every reader reload presence).

The frames between the kernel and the views (anywidget custom messages) are the dataclasses of
:mod:`zchat_nb.frames`; what a view sends is parsed there and a malformed frame is dropped. The
sender thread and the views' frames reach the poller as typed requests (``_Request``).

Each message is :func:`zchat_nb.render.message_payload`: sanitised HTML plus author, initials,
colour, ISO time and id. A view shows a message id once, so overlapping batches are harmless.
State that every view shares (room, rooms, unread counts, status, error) lives in traitlets.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import pathlib
import queue
import random
import threading
import time
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anywidget
import traitlets

from .exceptions import InvalidMessageError, ZChatConnectionError
from .frames import (
    Amend,
    Append,
    AttachmentData,
    AttachmentWanted,
    Before,
    FrameError,
    Hello,
    Name,
    Older,
    OlderBatch,
    Reset,
    Send,
    SendFailed,
    Sent,
    Share,
    Update,
    parse_view_frame,
)
from .media import IMAGE_TYPES
from .model import Message, check_author, check_message_id, check_room_name
from .render import attachment_payload, message_payload, reply_quote

if TYPE_CHECKING:
    from .client import ChatClient, ClientEvent
    from .model import ChatSession

__all__ = ["BACKLOG", "ChatWidget", "close_all"]

log = logging.getLogger(__name__)

_STATIC = pathlib.Path(__file__).parent / "static"

#: Messages a view gets when it is drawn or switches room, and per "load older".
BACKLOG = 200
#: Messages a view's actions can name (the shown ones, and some that scrolled away).
KNOWN = 2000
#: Seconds :meth:`ChatWidget.close` waits for each thread.
JOIN_TIMEOUT = 5.0
#: Sent messages the sender remembers by client id, for retries.
_MAX_DRAFTS = 256

_live: weakref.WeakSet[ChatWidget] = weakref.WeakSet()
_atexit_lock = threading.Lock()
_atexit_registered = False


#: Seconds before the poller reads again after a failed read, doubled each time up to RETRY_MAX.
RETRY_FIRST = 0.5
RETRY_MAX = 5.0
#: Seconds between two reads of the shown room's presence. A class joining at once would otherwise
#: make every widget reread it after every join: N² loads just when the server is busiest.
PRESENCE_GAP = 2.0


class ChatWidget(anywidget.AnyWidget):
    """A chat room shown in a notebook, updated live as messages are committed.

    Parameters
    ----------
    client
        A :class:`~zchat_nb.ChatClient`; ``None`` connects to the embedded default server (the
        widget then owns that client and closes it on :meth:`close`).
    room
        The room to show first.
    **kwargs
        Traitlets, for example ``poll_interval=0.5`` or ``height="30em"``.

    Every user action has a method: :meth:`send_message`, :meth:`switch_room`, :meth:`load_older`.
    """

    _esm = _STATIC / "widget.js"
    _css = _STATIC / "widget.css"

    room = traitlets.Unicode("general", help="The room shown; set it (or call switch_room) to switch.").tag(
        sync=True
    )
    rooms = traitlets.List(
        traitlets.Unicode(), help="Names of the rooms in the database, kept up to date by the poller."
    ).tag(sync=True)
    unread = traitlets.Dict(
        value_trait=traitlets.Int(),
        help="Messages from others that arrived in each room not shown, since it was last shown.",
    ).tag(sync=True)
    unread_mentions = traitlets.Dict(
        value_trait=traitlets.Int(),
        help="Of the unread messages, those that mention @user, per room (the tab shows them apart).",
    ).tag(sync=True)
    user = traitlets.Unicode(read_only=True, help="The name this widget's messages are sent as.").tag(
        sync=True
    )
    moderator = traitlets.Bool(
        read_only=True, help="True for a verified teacher (classroom certificate): may delete any message."
    ).tag(sync=True)
    ask_name = traitlets.Bool(
        False,
        help="Show a name field (remembered by the browser) and send nothing until a name is given; "
        "the name becomes this widget's user, a display name checked like any user name.",
    ).tag(sync=True)
    status = traitlets.Enum(
        ("connecting", "connected", "reconnecting", "disconnected"),
        "connecting",
        help="Connection state: connecting, connected, reconnecting (server away) or disconnected.",
    ).tag(sync=True)
    status_text = traitlets.Unicode(
        "", help="The connection state in words, with the server address and the last error."
    ).tag(sync=True)
    error = traitlets.Unicode(
        "", help="Why the last send failed, in words; empty after a send succeeds."
    ).tag(sync=True)
    height = traitlets.Unicode("22em", help="CSS height of the message list.").tag(sync=True)
    present = traitlets.List(
        traitlets.Unicode(), help="Users who show the shown room now (joined, lease not expired), sorted."
    ).tag(sync=True)
    poll_interval = traitlets.Float(
        1.0,
        help="Seconds between reads, for in-process storages only: a ZEO client's poller wakes on changes.",
    )
    heartbeat_interval = traitlets.Float(
        600.0,
        help="Seconds between presence lease renewals; a client that vanished counts as present for three.",
    )

    def __init__(self, client: ChatClient | None = None, room: str = "general", **kwargs: Any) -> None:
        owns_client = client is None
        if client is None:
            from .client import connect

            client = connect()
        self.client: ChatClient = client
        self._owns_client = owns_client
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[_Outgoing | None] = queue.SimpleQueue()
        self._events: deque[ClientEvent] = deque(maxlen=16)
        self._named = False  # ask_name: True once the view gave a name
        # Sender-only: the messages built for recent client ids, so that a retry is the same message.
        self._drafts: OrderedDict[tuple[str, str], Message] = OrderedDict()
        # Poller-only state: only the poller thread reads or writes these.
        self._session: ChatSession | None = None
        self._shown: str | None = None
        self._cache: deque[dict[str, Any]] = deque(maxlen=BACKLOG)
        self._oldest: Message | None = None
        #: The messages shown lately, by id: what a view's Reply, Edit, Delete or React names.
        self._known: OrderedDict[str, Message] = OrderedDict()
        self._more = False
        self._watch: dict[str, ChatSession] = {}
        self._known_rooms: set[str] | None = None
        self._poll_error = ""
        #: ``time.monotonic()`` from which presence may be read again (see PRESENCE_GAP); and
        #: whether a read was put off until then (the poller then wakes for it).
        self._presence_next = 0.0
        self._presence_put_off = False
        self._lost_at: float | None = None
        #: The last message this widget committed.
        self.last_sent: Message | None = None
        try:
            super().__init__(room=check_room_name(room), **kwargs)
            self.on_msg(self._on_view_message)
            self._unsubscribe = client.subscribe(self._on_client_event, fetched=True)
            self._poller = threading.Thread(
                target=self._poll_loop, name=f"zchat-poller-{self.model_id[:8]}", daemon=True
            )
            self._sender = threading.Thread(
                target=self._send_loop, name=f"zchat-sender-{self.model_id[:8]}", daemon=True
            )
            self._poller.start()
            self._sender.start()
        except BaseException:
            if owns_client:
                client.close()
            raise
        _live.add(self)
        _register_atexit()

    @traitlets.default("user")
    def _default_user(self) -> str:
        return self.client.user

    @traitlets.default("moderator")
    def _default_moderator(self) -> bool:
        signer = self.client.signer
        return signer is not None and signer.teacher and signer.name == self.client.user

    @traitlets.default("status_text")
    def _default_status_text(self) -> str:
        return f"connecting to {self.client.address_text}"

    @traitlets.validate("room")
    def _validate_room(self, proposal: dict[str, Any]) -> str:
        try:
            return check_room_name(proposal["value"])
        except InvalidMessageError as exc:
            raise traitlets.TraitError(str(exc)) from exc

    @traitlets.validate("poll_interval", "heartbeat_interval")
    def _validate_interval(self, proposal: dict[str, Any]) -> float:
        value = float(proposal["value"])
        if not (math.isfinite(value) and value > 0):
            name = proposal["trait"].name
            raise traitlets.TraitError(f"{name} must be a number of seconds > 0, not {value!r}")
        return value

    @traitlets.observe("room")
    def _room_changed(self, change: dict[str, Any]) -> None:
        self._wake.set()

    # -- user actions ----------------------------------------------------------------------

    def send_message(self, text: str) -> Future[Message]:
        """Send ``text`` to the room shown, without blocking; the Future gives the committed Message.

        A failure (empty text, server away past the client's timeout) is the Future's exception
        and also shows in the widget (:attr:`error`). Use ``widget.send_message(t).result(10)``
        to wait.
        """
        return self._submit(text, uuid.uuid4().hex, self._shown or self.room)

    def share(self, obj: Any, caption: str = "") -> Future[Message]:
        """Share a picture or table (as :meth:`ChatSession.share <zchat_nb.ChatSession.share>`)
        in the room shown, without blocking; a view does this when an image is pasted or dropped."""
        return self._submit(caption, uuid.uuid4().hex, self._shown or self.room, attachment=obj)

    def switch_room(self, name: str) -> None:
        """Show room ``name`` (created on first use) in every view of this widget."""
        self.room = check_room_name(name)

    def load_older(self) -> None:
        """Add up to :data:`BACKLOG` messages before the oldest shown to every view."""
        self._request(_OlderRequest(None, self._shown, None))

    def close(self) -> None:
        """Stop the poller and sender, remove the views and, if the widget made it, close the client."""
        self.stop()
        super().close()
        if getattr(self, "_owns_client", False):
            self.client.close()

    def stop(self, timeout: float = JOIN_TIMEOUT) -> bool:
        """Stop and join the threads but keep the views (they show "disconnected"); True if both ended.

        Safe to call twice. Sends still queued fail with :class:`ZChatConnectionError`.
        """
        if not hasattr(self, "_poller"):  # __init__ failed before the threads existed
            return True
        self._stopping.set()
        self._wake.set()
        self._unsubscribe()
        self._outbox.put(None)
        ended = True
        for thread in (self._sender, self._poller):
            if thread is not threading.current_thread() and thread.is_alive():
                thread.join(timeout)
            if thread.is_alive():
                log.warning("zchat_nb: %s did not stop within %g s", thread.name, timeout)
                ended = False
        _live.discard(self)
        return ended

    @property
    def closed(self) -> bool:
        """True once :meth:`stop` or :meth:`close` was called: nothing is polled or sent any more."""
        return self._stopping.is_set()

    # -- from the views (kernel thread) ----------------------------------------------------

    def _on_view_message(self, _widget: Any, content: Any, buffers: Any) -> None:
        try:
            frame = parse_view_frame(content, buffers or ())
        except FrameError as exc:  # not from our view: nothing to answer
            log.debug("zchat_nb: dropped a frame from a view: %s", exc)
            return
        if isinstance(frame, Hello):
            self._request(_HelloRequest(frame.view))
        elif isinstance(frame, Send):
            self._submit(frame.text, frame.client_id, frame.room)
        elif isinstance(frame, Older):
            self._request(_OlderRequest(frame.view, frame.room, frame.before))
        elif isinstance(frame, Share):
            self._submit(frame.caption, frame.client_id, frame.room, attachment=frame.data, name=frame.name)
        elif isinstance(frame, AttachmentWanted):
            self._request(frame)
        elif isinstance(frame, Amend):
            self._request(_AmendRequest(frame))
        elif isinstance(frame, Name):
            self.choose_name(frame.name)

    def choose_name(self, name: Any) -> None:
        """Send as ``name`` from now on (the view's name field calls this when :attr:`ask_name` is on)."""
        if not self.ask_name:
            return  # the notebook chose the name (``%zchat join --name``): a view may not change it
        try:
            name = check_author(name)
        except InvalidMessageError as exc:
            self.error = f"name not accepted: {exc}"
            return
        if self.error.startswith("name not accepted") or self.error.startswith("not sent: type your name"):
            self.error = ""
        self._named = True
        self.set_trait("user", name)
        self._outbox.put(_Outgoing(self._shown or self.room))  # a join: here now, under this name

    def _request(self, request: _Request) -> None:
        self._requests.put(request)
        self._wake.set()

    def _submit(
        self, text: Any, client_id: str, room: str, *, attachment: Any = None, name: str | None = None
    ) -> Future[Message]:
        future: Future[Message] = Future()
        outgoing = _Outgoing(room, text, client_id, future, attachment=attachment, name=name)
        return self._enqueue(outgoing, future, "not sent")

    def _on_client_event(self, event: ClientEvent) -> None:
        # On ZEO's networking thread or a committing one (this widget's own commits included):
        # no storage calls, no comm messages; just wake the poller.
        if event.kind in ("connected", "disconnected"):
            self._events.append(event)
        self._wake.set()

    # -- sender thread ---------------------------------------------------------------------

    def _send_loop(self) -> None:
        sessions: dict[str, ChatSession] = {}

        def session(room: str) -> ChatSession:
            if room not in sessions:
                sessions[room] = self.client.session(room)
            return sessions[room]

        # The room's first load asks for a join; renewals of many widgets are spread out.
        next_beat = time.monotonic() + self.heartbeat_interval * random.uniform(0.5, 1.0)
        joined: tuple[str, str] | None = None  # (room, user) of the last join committed
        join_retry = RETRY_FIRST
        try:
            while True:
                try:
                    item = self._outbox.get(timeout=max(0.0, next_beat - time.monotonic()))
                except queue.Empty:
                    item = _Outgoing(self._shown or self.room)  # time to renew the lease
                if item is None:
                    break
                if item.leave:
                    if joined is not None and joined[0] == item.room:
                        self._presence(session, joined, join=False)
                        joined = None
                    continue
                if item.future is None:  # a join or a renewal
                    next_beat = time.monotonic() + self.heartbeat_interval
                    if self.ask_name and not self._named:
                        continue  # nobody to announce yet
                    wanted = (item.room, self.user)
                    if joined is not None and joined != wanted:  # another name: the old one goes
                        self._presence(session, joined, join=False)
                        joined = None
                    if self._presence(session, wanted, join=True):
                        joined, join_retry = wanted, RETRY_FIRST
                    else:
                        # The server away or swamped (a whole class joining at once): try again soon,
                        # spread out and backing off, not at the next renewal ten minutes on.
                        wait = min(join_retry, self.heartbeat_interval) * random.uniform(0.5, 1.0)
                        next_beat = time.monotonic() + wait
                        join_retry = min(2 * join_retry, RETRY_MAX)
                    continue
                if self._stopping.is_set():
                    exc = ZChatConnectionError("this ChatWidget was closed before the message was sent")
                    item.future.set_exception(exc)
                    continue
                try:
                    if item.attachment is not None:
                        message = self._share(session(item.room), item)
                    elif item.action in ("send", "reply"):
                        message = session(item.room).post(self._draft(session(item.room), item))
                    else:
                        message = _act(session(item.room), item)
                except Exception as exc:
                    item.future.set_exception(exc)
                    what = "not sent" if item.action in ("send", "reply") else f"{item.action} failed"
                    self._request(_FailedRequest(item.client_id, f"{what}: {exc}"))
                else:
                    if item.action in ("send", "reply"):
                        self.last_sent = message
                    item.future.set_result(message)
                    self._request(_SentRequest(item.client_id, message))
            if joined is not None and not self.client.closed:  # stopped: say goodbye, if the server is there
                self._presence(session, joined, join=False, stopping=True)
        finally:
            self.client.close_connection()

    def _share(self, session: ChatSession, item: _Outgoing) -> Message:
        """Share ``item.attachment`` (with ``item.text`` as its caption) as this widget's user."""
        if self.ask_name and not self._named:
            raise InvalidMessageError("type your name in the name field first, then share again")
        caption = item.text if isinstance(item.text, str) else ""
        return session.share(item.attachment, caption, name=item.name, author=self.user)

    def _draft(self, session: ChatSession, item: _Outgoing) -> Message:
        """The message to commit for ``item``: the same one again when its client id was seen before.

        The view's client id becomes the message id, so a Retry of a send whose answer was lost
        (committed, or not) posts the same message, which the model stores once.
        """
        if self.ask_name and not self._named:
            raise InvalidMessageError("type your name in the name field first, then send again")
        key = (item.room, item.client_id)
        cached = self._drafts.get(key)
        parent = item.target.id if item.action == "reply" and item.target is not None else None
        if cached is not None and cached.text == item.text and cached.reply_to == parent:
            self._drafts.move_to_end(key)
            return cached
        # Other text under a known client id is another message: it gets an id of its own.
        id_ = item.client_id if cached is None and _is_message_id(item.client_id) else None
        message = session.draft(item.text, author=self.user, id=id_)
        if parent is not None:
            message = dataclasses.replace(message, reply_to=parent)
        self._drafts[key] = message
        while len(self._drafts) > _MAX_DRAFTS:
            self._drafts.popitem(last=False)
        return message

    def _presence(
        self,
        session: Callable[[str], ChatSession],
        where: tuple[str, str],
        *,
        join: bool,
        stopping: bool = False,
    ) -> bool:
        """Commit a join (or lease renewal) or a leave of ``where`` (room, user); True if committed."""
        if (self._stopping.is_set() and not stopping) or not self.client.is_connected():
            return False  # the status line already says the server is away; the lease expires
        room, user = where
        try:
            if join:
                session(room).join(user=user)  # its commit wakes the poller, which reads presence
            else:
                session(room).leave(user=user)
        except Exception as exc:
            log.debug("zchat_nb: %s %r failed: %s", "joining" if join else "leaving", room, exc)
            return False
        return True

    # -- poller thread ---------------------------------------------------------------------

    def _poll_loop(self) -> None:
        retry = RETRY_FIRST
        try:
            while not self._stopping.is_set():
                self._wake.clear()  # before reading: a wake-up during the read is not lost
                if not self._step():
                    break
                if self._poll_error:
                    # The read failed (the server away, slow or overloaded): read again soon, not
                    # only at the room's next change, which may never come. Backs off to RETRY_MAX.
                    self._wake.wait(retry if self.client.tracks_changes else min(retry, self.poll_interval))
                    retry = min(2 * retry, RETRY_MAX)
                    continue
                retry = RETRY_FIRST
                if self._session is not None and self._session.behind:
                    continue  # a very large room is read a bounded slice per round
                # A ZEO client wakes us on every change; the timer only expires leases (no loads),
                # or reads the presence put off by PRESENCE_GAP.
                wait = self.heartbeat_interval if self.client.tracks_changes else self.poll_interval
                if self._presence_put_off:
                    wait = min(wait, max(0.0, self._presence_next - time.monotonic()))
                self._wake.wait(wait)
        except Exception:
            log.exception("zchat_nb: the poller of %r failed", self)
        finally:
            why = "the client was closed" if self.client.closed else "the widget was stopped"
            self._set_status("disconnected", f"disconnected from {self.client.address_text}: {why}")
            self.client.close_connection()

    def _step(self) -> bool:
        """One round of the poller; False when the client is closed."""
        if self.client.closed:
            return False
        try:
            self._read()
        except ZChatConnectionError as exc:  # ZChatDisconnected included
            if self.client.closed:
                return False
            self._poll_error = str(exc)
        except Exception as exc:
            if self.client.closed:
                return False
            log.exception("zchat_nb: reading room %r failed", self._shown)
            self._poll_error = f"reading failed: {type(exc).__name__}: {exc}"
        else:
            self._poll_error = ""
        self._update_status()
        self._answer_requests()
        return True

    def _read(self) -> None:
        target = self.room
        if target != self._shown or self._session is None:
            self._load_room(target)
        assert self._session is not None
        self._deliver(self._session.new_messages())
        self._apply_updates(self._session.updated_messages())
        self._refresh_rooms()
        self._count_unread()
        self._read_presence()

    def _read_presence(self) -> None:
        now = time.monotonic()
        self._presence_put_off = now < self._presence_next
        if self._presence_put_off:
            return
        assert self._session is not None
        present = self._session.present(within=3 * self.heartbeat_interval)
        self._presence_next = now + PRESENCE_GAP
        if present != self.present:
            self.present = present

    def _load_room(self, name: str) -> None:
        session = self.client.session(name, backlog=BACKLOG)
        first = session.new_messages()  # the last BACKLOG messages, in one transaction
        previous = self._shown
        self._session, self._shown = session, name
        self._presence_next = 0.0  # who is in the new room: at once
        self._outbox.put(_Outgoing(name))  # say we are here now
        self._cache.clear()
        self._cache.extend(self._payload(m) for m in first)
        self._oldest = first[0] if first else None
        self._more = len(first) >= BACKLOG
        self._watch.pop(name, None)
        if previous is not None and previous != name:
            self._watch[previous] = self.client.session(previous, backlog=0)
            self._outbox.put(_Outgoing(previous, leave=True))
        if name in self.unread:
            self.unread = {room: n for room, n in self.unread.items() if room != name}
        if name in self.unread_mentions:
            self.unread_mentions = {room: n for room, n in self.unread_mentions.items() if room != name}
        self._broadcast_reset()

    def _broadcast_reset(self, view: str | None = None) -> None:
        self.send(Reset(view, self._shown, list(self._cache), self._more).to_wire())

    def _deliver(self, messages: list[Message]) -> None:
        if not messages:
            return
        payloads = [self._payload(m) for m in messages]
        self._cache.extend(payloads)
        if self._oldest is None:
            self._oldest = messages[0]
        if len(messages) > BACKLOG:  # a flood, or a long outage: start the views afresh
            self._more = True
            self._oldest = messages[-BACKLOG]
            self._broadcast_reset()
        else:
            self.send(Append(self._shown, payloads).to_wire())

    def _refresh_rooms(self) -> None:
        names = sorted(self.client.rooms())
        if self._known_rooms is None:  # the rooms that exist now: count what arrives from now on
            self._known_rooms = set(names)
            for name in names:
                if name != self._shown:
                    self._watch[name] = self.client.session(name, backlog=0)
        for name in names:
            if name not in self._known_rooms:  # a room made since: all of it is unread
                self._known_rooms.add(name)
                if name != self._shown:
                    self._watch[name] = self.client.session(name, backlog=None)
        if names != list(self.rooms):
            self.rooms = names

    def _count_unread(self) -> None:
        counts, mentions = dict(self.unread), dict(self.unread_mentions)
        for name, session in list(self._watch.items()):
            new = [m for m in session.new_messages() if m.author != self.user]
            if new:
                counts[name] = counts.get(name, 0) + len(new)
            mentioning = sum(1 for m in new if self.user in m.mentions)
            if mentioning:
                mentions[name] = mentions.get(name, 0) + mentioning
        if counts != self.unread:
            self.unread = counts
        if mentions != self.unread_mentions:
            self.unread_mentions = mentions

    def _answer_requests(self) -> None:
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            if isinstance(request, _HelloRequest):
                if self._shown is not None:
                    self._broadcast_reset(view=request.view)
            elif isinstance(request, _OlderRequest):
                self._send_older(request)
            elif isinstance(request, _SentRequest):
                self.error = ""
                self.send(Sent(request.client_id, request.message.id).to_wire())
            elif isinstance(request, _FailedRequest):
                self.error = request.error
                self.send(SendFailed(request.client_id, request.error).to_wire())
            elif isinstance(request, _AmendRequest):
                self._amend_from_view(request.frame)
            elif isinstance(request, AttachmentWanted):
                self._send_attachment(request)

    # -- attachments (poller thread) ---------------------------------------------------------

    def _send_attachment(self, request: AttachmentWanted) -> None:
        """Send a view the checked bytes of an attachment it shows, as a comm buffer.

        Only bytes read from the blob and sniffed here reach the view, which makes a ``blob:`` URL
        of them: nothing a message says can make a browser fetch anything.
        """
        message = self._known.get(request.message)
        if message is None or message.deleted or request.index >= len(message.attachments):
            return  # not a message this widget showed
        attachment = message.attachments[request.index]
        try:
            data = self.client.attachment_bytes(message, request.index)
        except Exception as exc:
            error = str(exc) or type(exc).__name__
            frame = AttachmentData(request.view, message.id, request.index, attachment.mime, error)
            self.send(frame.to_wire())
            return
        if attachment.mime not in IMAGE_TYPES:  # tables: the view offers the bytes as a download
            frame = AttachmentData(request.view, message.id, request.index, "text/csv")
        else:
            frame = AttachmentData(request.view, message.id, request.index, attachment.mime)
        self.send(frame.to_wire(), buffers=[data])

    def _send_older(self, request: _OlderRequest) -> None:
        view, room = request.view, request.room
        if self._session is None or (room is not None and room != self._shown):
            return  # asked about a room no longer shown
        # A view's "before" is used for its key only.
        given = request.before
        before = Message(given.id, "", "", given.ts) if given is not None else self._oldest
        older: list[Message] = []
        if before is not None:
            if not self.client.is_connected():
                self.error = "cannot load older messages while the server is away"
                return
            try:
                older = self._session.history(BACKLOG, before=before)
            except Exception as exc:
                self.error = f"loading older messages failed: {exc}"
                return
        if older and (self._oldest is None or older[0].key < self._oldest.key):
            self._oldest = older[0]
        payloads = [self._payload(m) for m in older]
        self.send(OlderBatch(view, self._shown, payloads, len(older) >= BACKLOG).to_wire())

    def _payload(self, message: Message) -> dict[str, Any]:
        self._known[message.id] = message
        self._known.move_to_end(message.id)
        while len(self._known) > KNOWN:
            self._known.popitem(last=False)
        parent = self._known.get(message.reply_to) if message.reply_to is not None else None
        payload = message_payload(message, own=message.author == self.user, parent=parent)
        if message.attachments and not message.deleted:
            payload["attachments"] = attachment_payload(message)
        return payload

    # -- conversations: replies, edits, deletes, reactions -----------------------------------

    def reply(self, message: Message, text: str) -> Future[Message]:
        """Send ``text`` as an answer to ``message``, without blocking (like :meth:`send_message`)."""
        return self._act("reply", message, text)

    def edit(self, message: Message, text: str) -> Future[Message]:
        """Replace the text of your ``message``; the Future gives its new state."""
        return self._act("edit", message, text)

    def delete(self, message: Message) -> Future[Message]:
        """Delete your ``message`` (a verified teacher: anyone's)."""
        return self._act("delete", message, "")

    def react(self, message: Message, emoji: str) -> Future[Message]:
        """Add your reaction ``emoji`` to ``message``."""
        return self._act("react", message, emoji)

    def unreact(self, message: Message, emoji: str) -> Future[Message]:
        """Take back your reaction ``emoji`` on ``message``."""
        return self._act("unreact", message, emoji)

    def _act(self, action: str, message: Message, arg: Any, client_id: str = "") -> Future[Message]:
        future: Future[Message] = Future()
        client_id = client_id or uuid.uuid4().hex
        outgoing = _Outgoing(self._shown or self.room, arg, client_id, future, action=action, target=message)
        return self._enqueue(outgoing, future, f"{action} failed")

    def _enqueue(self, outgoing: _Outgoing, future: Future[Message], failed: str) -> Future[Message]:
        """Hand ``outgoing`` to the sender thread, or fail its future at once if the widget is closed."""
        if self._stopping.is_set():
            exc = ZChatConnectionError("this ChatWidget is closed; make a new one with ChatWidget(client)")
            future.set_exception(exc)
            self._request(_FailedRequest(outgoing.client_id, f"{failed}: {exc}"))
        else:
            self._outbox.put(outgoing)
        return future

    def _amend_from_view(self, frame: Amend) -> None:
        message = self._known.get(frame.id)
        if message is None or frame.room != self._shown:
            self._request(
                _FailedRequest(frame.client_id, f"{frame.action} failed: that message is no longer shown")
            )
            return
        self._act(frame.action, message, frame.arg, frame.client_id)

    def _apply_updates(self, messages: list[Message]) -> None:
        """Show messages that changed (edited, deleted, reacted to) in place in every view."""
        if not messages:
            return
        payloads = {m.id: self._payload(m) for m in messages}
        changed = {m.id: m for m in messages}
        for i, cached in enumerate(self._cache):
            if cached["id"] in payloads:
                self._cache[i] = payloads[cached["id"]]
            elif cached.get("reply") and cached["reply"]["id"] in changed:
                # A view drawn later quotes the parent as it is now (edited, deleted).
                parent = changed[cached["reply"]["id"]]
                self._cache[i] = {**cached, "reply": reply_quote(parent.id, parent)}
        self.send(Update(self._shown, list(payloads.values())).to_wire())

    # -- status ----------------------------------------------------------------------------

    def _update_status(self) -> None:
        while self._events:
            event = self._events.popleft()
            if event.kind == "disconnected":
                self._lost_at = event.time
            elif event.kind == "connected":
                self._lost_at = None
                # What failed while the server was away is history now: "not sent" messages keep
                # their own mark (and Retry) in the log; the banner would only mislead.
                self.error = ""
        where = self.client.address_text
        if self.client.is_connected():
            self._lost_at = None
            if self.status != "connected" and self.error:
                self.error = ""  # a "not sent" from the outage is stale: sends work again
            if self._poll_error:
                self._set_status("connected", f"connected to {where}, but {self._poll_error}")
            else:
                self._set_status("connected", f"connected to {where} as {self.user}")
            return
        if self._lost_at is None:
            self._lost_at = time.time()
        since = time.strftime("%H:%M:%S", time.localtime(self._lost_at))
        reason = self._poll_error or "the server does not answer"
        hint = self.client.restart_hint
        if hint and hint not in reason:
            reason = f"{reason}; {hint}"
        self._set_status("reconnecting", f"reconnecting to {where} (lost at {since}): {reason}")

    def _set_status(self, status: str, text: str) -> None:
        self.status = status
        self.status_text = text

    def __repr__(self) -> str:
        return f"<ChatWidget room={self.room!r} user={self.user!r} status={self.status!r}>"


@dataclass(frozen=True)
class _Outgoing:
    """What the sender thread commits: a message (with a Future), a join or renewal (without), a leave."""

    room: str
    text: Any = None
    client_id: str = ""
    future: Future[Message] | None = None
    #: Something to share (then ``text`` is its caption), and the name a view gave it.
    attachment: Any = None
    name: str | None = None
    #: "send", or a conversation action ("reply", "edit", "delete", "react", "unreact") on ``target``.
    action: str = "send"
    target: Message | None = None
    leave: bool = False


def _is_message_id(value: str) -> bool:
    try:
        check_message_id(value)
    except InvalidMessageError:
        return False
    return True


# -- what reaches the poller: the sender's outcomes and the views' requests -------------------


@dataclass(frozen=True)
class _HelloRequest:
    """A view was drawn: send it the room."""

    view: str


@dataclass(frozen=True)
class _OlderRequest:
    """Send ``view`` (None: all) the messages of ``room`` before ``before`` (None: the oldest shown)."""

    view: str | None
    room: str | None
    before: Before | None


@dataclass(frozen=True)
class _SentRequest:
    """The sender committed the message the view sent as ``client_id``."""

    client_id: str
    message: Message


@dataclass(frozen=True)
class _AmendRequest:
    """A view asked to reply to, edit, delete or react to a message it shows."""

    frame: Amend


def _act(session: ChatSession, item: _Outgoing) -> Message:
    """Commit what the sender thread was given: a message, a reply or an amendment."""
    if item.action == "send" or item.target is None:
        return session.add_message(item.text)
    if item.action == "reply":
        return session.add_message(item.text, reply_to=item.target)
    if item.action == "delete":
        return session.delete(item.target)
    method = {"edit": session.edit, "react": session.react, "unreact": session.unreact}[item.action]
    return method(item.target, item.text)


@dataclass(frozen=True)
class _FailedRequest:
    """The message the view sent as ``client_id`` was not sent, for the reason ``error``."""

    client_id: str
    error: str


_Request = _HelloRequest | _OlderRequest | _SentRequest | _FailedRequest | _AmendRequest | AttachmentWanted


def close_all() -> None:
    """Close every ChatWidget of this process (``%unload_ext zchat_nb`` calls this)."""
    for widget in list(_live):
        try:
            widget.close()
        except Exception:
            log.debug("zchat_nb: closing %r failed", widget, exc_info=True)


def _stop_all() -> None:
    # At interpreter exit the kernel's sockets may be gone: stop the threads, leave the comms.
    for widget in list(_live):
        widget.stop(timeout=1.0)


def _register_atexit() -> None:
    global _atexit_registered
    with _atexit_lock:
        if not _atexit_registered:
            atexit.register(_stop_all)
            _atexit_registered = True
