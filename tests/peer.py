"""A chat client in another process, driven by JSON lines on stdin (for two-process tests).

``python -m tests.peer ADDRESS ROOM [--user U] [--tls FOLDER]``; each input line is
``{"op": ..., ...}`` and gets one output line: ``{"ok": result}`` or ``{"error": [type, text]}``.
Messages go out as dicts of their fields; ops name messages by id (the peer keeps what it saw).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import zchat_nb
from zchat_nb.model import Message


def as_dict(m: Message) -> dict[str, Any]:
    return {
        "id": m.id,
        "author": m.author,
        "text": m.text,
        "time": m.time,
        "reply_to": m.reply_to,
        "edited": m.edited,
        "deleted": m.deleted,
        "reactions": {emoji: list(users) for emoji, users in m.reactions.items()},
        "mentions": list(m.mentions),
        "verified": m.verified,
    }


class Peer:
    def __init__(self, chat: zchat_nb.ChatSession) -> None:
        self.chat = chat
        self.known: dict[str, Message] = {}

    def keep(self, messages: list[Message]) -> list[dict[str, Any]]:
        for m in messages:
            self.known[m.id] = m
        return [as_dict(m) for m in messages]

    def run(self, op: str, args: dict[str, Any]) -> Any:
        chat = self.chat
        if op == "send":
            parent = self.known.get(args.get("reply_to") or "")
            return self.keep([chat.add_message(args["text"], reply_to=parent)])[0]
        if op in ("edit", "delete", "react", "unreact"):
            target = self.known[args["id"]]
            extra = [args["arg"]] if "arg" in args else []
            return self.keep([getattr(chat, op)(target, *extra)])[0]
        if op == "new":
            return self.keep(chat.new_messages(timeout=args.get("timeout")))
        if op == "updated":
            return self.keep(chat.updated_messages())
        if op == "history":
            return self.keep(chat.history(args.get("n", 200)))
        if op == "skipped":
            return [where for where, _ in chat.skipped]
        raise ValueError(f"unknown op {op!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("room")
    parser.add_argument("--user", default=None)
    parser.add_argument("--tls", default=None)
    args = parser.parse_args()
    client = zchat_nb.connect(args.address, user=args.user, tls=args.tls, timeout=20.0)
    peer = Peer(client.session(args.room))
    print(json.dumps({"ok": "ready"}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply: dict[str, Any] = {"ok": peer.run(request.pop("op"), request)}
        except Exception as exc:
            reply = {"error": [type(exc).__name__, str(exc)]}
        print(json.dumps(reply), flush=True)
    client.close()


if __name__ == "__main__":
    main()
