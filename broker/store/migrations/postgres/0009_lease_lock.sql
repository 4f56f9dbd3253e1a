-- Named locks shared by every daemon on this store (DESIGN §9), held by lease:
-- a connector that must read, then create what it did not find (SAP has no
-- unique key to refuse a second business partner for one account), holds one
-- across its calls. Nothing is held open meanwhile: a row is the lock, its
-- owner a token of one holder, and a holder that died frees it when the lease
-- runs out. broker/keyed_lock.py takes and gives them back.
CREATE TABLE lease_lock (
    key    text        PRIMARY KEY,
    owner  text        NOT NULL,
    until  timestamptz NOT NULL
);
