"""Writes room_v2.fs with the model of commit b22eec2 (heads/count, before the fan-out rework).

The room has messages, a reply, an edit, a reaction, a delete and a heartbeat: the shape every
room written before the fan-out rework has. Run from a checkout of that commit:
``PYTHONPATH=OLD_CHECKOUT python make_room_v2.py room_v2.fs``.
"""

import itertools
import sys

import ZODB
import ZODB.FileStorage

import zchat_nb

path = sys.argv[1]
db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
ticks = itertools.count(1_750_000_000.0)
a = zchat_nb.ChatClient(db, user="alice", clock=lambda: next(ticks))
b = zchat_nb.ChatClient(db, user="bob", clock=lambda: next(ticks))
sa, sb = a.session("general"), b.session("general")
first = sa.add_message("hello from the heads/count model")
sb.add_message("hi @alice", reply_to=first)
typo = sa.add_message("thrid")
sa.edit(typo, "third")
sb.react(first, "👍")
gone = sb.add_message("to be deleted")
sb.delete(gone)
sa.heartbeat()
a.session("other").add_message("elsewhere")
a.close()
b.close()
db.close()
