"""Writes room_v1.fs with the model of commit dab8eab (before amendments): the compatibility fixture.

Run from a checkout of that commit: ``PYTHONPATH=OLD_CHECKOUT python make_room_v1.py room_v1.fs``.
"""

import itertools
import sys

import ZODB
import ZODB.FileStorage

import zchat_nb

path = sys.argv[1]
db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
ticks = itertools.count(1_700_000_000.0)
a = zchat_nb.ChatClient(db, user="alice", clock=lambda: next(ticks))
b = zchat_nb.ChatClient(db, user="bob", clock=lambda: next(ticks))
sa, sb = a.session("general"), b.session("general")
sa.add_message("hello from the old model")
sb.add_message("hi @alice")
sa.add_message("third")
sa.heartbeat()
a.session("other").add_message("elsewhere")
a.close()
b.close()
db.close()
