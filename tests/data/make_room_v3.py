"""Writes room_v3.fs with the model of commit ee1f507 (one Tail per writer holding its newest record,
every record also in the writer's stream), before records waited in the tail.

Alice's 40 messages fill more than one bucket of her stream; Bob replies, edits, reacts and deletes.
Run from a checkout of that commit: ``PYTHONPATH=OLD_CHECKOUT python make_room_v3.py room_v3.fs``.
"""

import itertools
import sys

import ZODB
import ZODB.FileStorage

import zchat_nb

path = sys.argv[1]
db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
ticks = itertools.count(1_760_000_000.0)
a = zchat_nb.ChatClient(db, user="alice", clock=lambda: next(ticks))
b = zchat_nb.ChatClient(db, user="bob", clock=lambda: next(ticks))
sa, sb = a.session("general"), b.session("general")
first = sa.add_message("hello from the one-record tails")
for i in range(39):
    sa.add_message(f"alice {i}")
sb.add_message("hi @alice", reply_to=first)
typo = sb.add_message("thrid")
sb.edit(typo, "third")
sb.react(first, "👍")
gone = sb.add_message("to be deleted")
sb.delete(gone)
sa.join()
a.session("other").add_message("elsewhere")
a.close()
b.close()
db.close()
