"""One networking thread per process for every ZEO client of zchat_nb.

ZEO gives each ``ClientStorage`` a thread of its own running its own asyncio loop. A process with
several clients (a teacher's kernel, a notebook with a widget and a dashboard, a benchmark's ten
readers) then has as many networking threads, and when an invalidation reaches all of them at
once each thread wakes, takes the GIL in turn and goes back to sleep: with ten readers in a
process that was 12% of the CPU a delivery cost when the machine was quiet, more under load
(``benchmarks/RESULTS.md``).
:class:`SharedLoopRunner` is ZEO's ``ClientRunner`` on a loop that all clients of the process share:
each keeps its own connection, cache and protocol, only the thread is shared, so the
invalidations that arrive together are handled in one wake-up.

The loop's thread starts with the first client and stops when the last one closes. Nothing that
runs on it may block: ZEO's protocol never does, and zchat_nb's hooks (see
:class:`~zchat_nb.events.ClientEvents`) only hand over to other threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
from typing import Any

from ZEO.asyncio import futures
from ZEO.asyncio.client import ClientRunner
from ZEO.asyncio.compat import new_event_loop
from ZEO.Exceptions import ClientDisconnected

THREAD_NAME = "zchat_nb zeo client networking thread"


class _SharedLoop:
    """The process's networking loop, running on its thread while any client uses it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._users = 0
        #: Taken by a client's close, so that it lets go of the loop once whoever closes it.
        self.closing = threading.Lock()

    def acquire(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = new_event_loop()
                started = threading.Event()
                thread = threading.Thread(
                    target=self._run, args=(loop, started), name=THREAD_NAME, daemon=True
                )
                thread.start()
                started.wait()
                self._loop, self._thread = loop, thread
            self._users += 1
            return self._loop

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._loop is None:
                return
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join(9)  # as ZEO waits for a client's own thread

    def is_current(self) -> bool:
        """Whether the calling thread is the networking thread."""
        thread = self._thread
        return thread is not None and thread is threading.current_thread()

    def users(self) -> int:
        """How many clients use the loop now."""
        with self._lock:
            return self._users

    def forget(self) -> None:
        """In a forked child: the parent's thread did not come along, the next client starts one."""
        self.__init__()  # type: ignore[misc]


SHARED = _SharedLoop()
os.register_at_fork(after_in_child=SHARED.forget)


def _io_call(loop: asyncio.AbstractEventLoop, coro: Any, wait: bool = True) -> Any:
    """ZEO's ``io_call`` (run ``coro`` on the networking thread; its result, or the future if not
    ``wait``) with a :class:`HandOffTask`."""
    future = HandOffTask(coro, loop)
    try:
        return future.result() if wait else future
    finally:
        del future  # as ZEO's: a raised error's traceback would keep it in a cycle


def refuse_closing_here() -> None:
    """Raise if called on the networking thread: closing a client there would wait for that very
    thread (it runs the close), for ever."""
    if SHARED.is_current():
        raise RuntimeError(
            "a zchat_nb client cannot be closed on the networking thread (in a subscriber's"
            " callback): close it from another thread"
        )


class HandOffTask(futures.ConcurrentTask):
    """ZEO's ``ConcurrentTask`` (a call run on the networking thread, its answer waited for by
    another) without the ``time.sleep(1e-6)`` its completion ends with.

    ZEO sleeps there to hand the GIL to the thread that waits for the answer. But the sleep is
    longer than asked (the kernel's timer slack, 50 µs), and the networking thread then sends
    nothing: a commit's vote answer wakes the sending thread, which asks for the finish at once,
    and the finish went out only when the sleep ended, while the server held its commit lock
    for this client. Without it, the waiting thread takes the GIL as soon as the networking
    thread next waits for the network. 8 writers on 2 cores (``python -m benchmarks.writers``):
    0.86-0.88 of the raw control's rate with the sleep, 0.86-1.05 (0.95 typical) without.
    """

    def __init__(self, coro: Any, loop: asyncio.AbstractEventLoop) -> None:
        # ConcurrentTask.__init__, with ConcurrentFuture's completion callback (set, then sleep)
        # replaced by the set alone.
        futures.Future.__init__(self, loop=loop)
        self.completed = threading.Event()
        self.add_done_callback(_set_completed)
        self.executor = futures.CoroutineExecutor(self, coro)
        loop.call_soon_threadsafe(self.executor.step)


def _set_completed(future: HandOffTask) -> None:
    future.completed.set()


#: Whether ZEO's futures are its Python ones (their compiled variant cannot be subclassed so).
HAND_OFF = futures.ConcurrentTask.__module__ == futures.__name__


class SharedLoopRunner(ClientRunner):
    """ZEO's client runner on the process's shared loop (pass as ``ClientStorage(_client_factory=...)``).

    The same arguments and behaviour as ZEO's ``ClientThread``, except that closing leaves the
    thread to the other clients.
    """

    def __init__(
        self,
        addrs: Any,
        client: Any,
        cache: Any,
        storage_key: str = "1",
        read_only: Any = False,
        timeout: float = 30,
        disconnect_poll: float = 1,
        ssl: Any = None,
        ssl_server_hostname: str | None = None,
    ) -> None:
        self.set_options(
            addrs,
            client,
            cache,
            storage_key,
            read_only,
            timeout,
            disconnect_poll,
            ssl=ssl,
            ssl_server_hostname=ssl_server_hostname,
        )
        loop = SHARED.acquire()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()

        def setup() -> None:  # on the loop, as ZEO's thread sets a client up on its own
            try:
                self.setup_delegation(loop)
            except BaseException as exc:
                ready.set_exception(exc)
            else:
                ready.set_result(None)

        try:
            loop.call_soon_threadsafe(setup)
            ready.result()
        except BaseException:
            self._released = True
            SHARED.release()
            raise

    _released = False

    def setup_delegation(self, loop: asyncio.AbstractEventLoop) -> None:
        super().setup_delegation(loop)
        if HAND_OFF:
            self.io_call = functools.partial(_io_call, loop)

    def async_iter(self, it: Any) -> None:
        """ZEO's ``async_iter`` (hand one-way messages to the networking thread) without the
        ``time.sleep(1e-6)`` it ends with to hand that thread the CPU: the vote follows at once
        and waits for that thread anyway, while the sleep gives the core away for a whole time
        slice when other processes want it (8 writers on 2 cores)."""
        client = self.client
        if not client.operational:
            raise ClientDisconnected()
        self.loop.call_soon_threadsafe(client.call_async_iter, it)

    def close(self) -> None:
        """Close this client's connection (waiting for it), then let go of the loop."""
        refuse_closing_here()
        with SHARED.closing:  # once, whichever thread closes first
            if self._released:
                return
            self._released = True
        try:
            super().close()
        finally:
            SHARED.release()

    def is_closed(self) -> bool:
        return self._released
