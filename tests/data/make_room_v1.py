import itertools, sys, ZODB, ZODB.FileStorage, zchat_nb
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
a.close(); b.close()
db.close()
