-- PostgreSQL's 0008, as far as SQLite needs it: one writer at a time leaves
-- no race to close, and outbox_sent is in 0001 already. Dead letters nothing
-- waits on any more (released, replayed, purged), by last_seen: the prune
-- deletes them after the retention without visiting the others.
CREATE INDEX dead_letter_settled ON dead_letter (last_seen)
    WHERE status IN ('released', 'replayed', 'purged');
