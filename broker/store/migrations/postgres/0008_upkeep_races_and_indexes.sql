-- Hourly upkeep when two daemons run it at once, and the indexes it reads.

-- Hold sweeps. Two daemons' sweeps each listed the same freed instance from
-- their own snapshot, and q2c_promote_hold then took the first *still* held
-- message: the second sweep released the second held message too, and the
-- instance's order was lost. Sweeps now queue behind one another on an
-- advisory lock (7170000 serializes migrations, 7170001 partition upkeep),
-- so each lists what the previous one left; and each instance is handed on
-- only if it is still as the sweep saw it, read again under a row lock, so a
-- purge or an operator's release that got there first is not done twice.

-- Hand an instance's hold on (q2c_promote_hold) if it is still as seen: held
-- by p_blocker, still purged; or, p_blocker NULL, not held at all, with a
-- message held. The hold's row is locked first (as release_hold and the
-- commit do), or, with no hold to lock, the first held message: whoever
-- handed it on before has committed by then, and the check sees it. Returns
-- whether the instance was handed on.
CREATE FUNCTION q2c_promote_hold_seen(
    p_workflow text, p_correlation_id text, p_blocker text
)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_blocker text;
BEGIN
    IF p_blocker IS NOT NULL THEN
        SELECT message_id INTO v_blocker FROM hold
        WHERE workflow = p_workflow AND correlation_id = p_correlation_id
        FOR UPDATE;
        IF v_blocker IS DISTINCT FROM p_blocker OR NOT EXISTS (
            SELECT 1 FROM dead_letter
            WHERE message_id = p_blocker AND status = 'purged'
        ) THEN
            RETURN false;
        END IF;
    ELSE
        PERFORM 1 FROM dead_letter
        WHERE workflow = p_workflow AND correlation_id = p_correlation_id
          AND status = 'held'
        ORDER BY held_seq
        LIMIT 1
        FOR UPDATE;
        IF NOT FOUND OR EXISTS (
            SELECT 1 FROM hold
            WHERE workflow = p_workflow AND correlation_id = p_correlation_id
        ) THEN
            RETURN false;
        END IF;
    END IF;
    PERFORM q2c_promote_hold(p_workflow, p_correlation_id);
    RETURN true;
END
$$;

-- As in 0003, serialized, and counting only the instances handed on.
CREATE OR REPLACE FUNCTION q2c_sweep_holds(p_limit integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    moved integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(7170002);
    FOR r IN
        SELECT h.workflow, h.correlation_id, h.message_id
        FROM hold AS h JOIN dead_letter AS d ON d.message_id = h.message_id
        WHERE d.status = 'purged'
        ORDER BY h.workflow, h.correlation_id
        LIMIT p_limit
    LOOP
        IF q2c_promote_hold_seen(r.workflow, r.correlation_id, r.message_id) THEN
            moved := moved + 1;
        END IF;
    END LOOP;
    FOR r IN
        SELECT DISTINCT d.workflow, d.correlation_id
        FROM dead_letter AS d
        WHERE d.status = 'held'
          AND NOT EXISTS (
              SELECT 1 FROM hold AS h
              WHERE h.workflow = d.workflow AND h.correlation_id = d.correlation_id)
        ORDER BY d.workflow, d.correlation_id
        LIMIT p_limit
    LOOP
        IF q2c_promote_hold_seen(r.workflow, r.correlation_id, NULL) THEN
            moved := moved + 1;
        END IF;
    END LOOP;
    RETURN moved;
END
$$;

-- Partitions. A row for a new day committed into the DEFAULT partition after
-- its rows were moved out and before ATTACH made ATTACH fail (23514). Locking
-- only the DEFAULT partition is not enough: an insert already routed there
-- waits for that lock and then fails the new constraint itself. So the
-- parent (ONLY: not its partitions) is locked against inserts, in SHARE mode,
-- before rows move: inserts wait (briefly: one day's DEFAULT rows), then
-- route to the new partition. Only when a partition is made, which is once a
-- day per table; the caller's lock_timeout bounds the wait for the lock.
-- Owner's rights and search path as set by 0007 (CREATE OR REPLACE resets
-- them; the grants stay).
CREATE OR REPLACE FUNCTION q2c_ensure_partitions(p_table text, p_first date, p_last date)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT
AS $$
DECLARE
    i       integer;
    d       date;
    part    text;
    col     text;
    lo      text;
    hi      text;
    created integer := 0;
BEGIN
    IF p_table NOT IN ('inbox', 'journal') THEN
        RAISE EXCEPTION 'q2c_ensure_partitions: unknown table %', p_table;
    END IF;
    PERFORM pg_advisory_xact_lock(7170001);
    col := CASE p_table WHEN 'inbox' THEN 'day' ELSE 'at' END;
    FOR i IN 0 .. (p_last - p_first) LOOP
        d := p_first + i;
        part := p_table || '_p' || to_char(d, 'YYYYMMDD');
        CONTINUE WHEN to_regclass(part) IS NOT NULL;
        IF p_table = 'journal' THEN
            lo := to_char(d, 'YYYY-MM-DD') || ' 00:00:00+00';
            hi := to_char(d + 1, 'YYYY-MM-DD') || ' 00:00:00+00';
        ELSE
            lo := to_char(d, 'YYYY-MM-DD');
            hi := to_char(d + 1, 'YYYY-MM-DD');
        END IF;
        EXECUTE format('LOCK TABLE ONLY %I IN SHARE MODE', p_table);
        EXECUTE format(
            'CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
            part, p_table);
        EXECUTE format(
            'WITH moved AS (DELETE FROM %I WHERE %I >= %L AND %I < %L RETURNING *) '
            'INSERT INTO %I SELECT * FROM moved',
            p_table || '_default', col, lo, col, hi, part);
        EXECUTE format(
            'ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
            p_table, part, lo, hi);
        created := created + 1;
    END LOOP;
    RETURN created;
END
$$;

-- Indexes for the hourly prune and the status counts, which scanned the
-- whole table. Outbox rows kept as sent by older releases, by when they were
-- sent (prune); parked outbox rows (counts); and dead letters nothing waits
-- on any more (released, replayed, purged), by last_seen: the prune deletes
-- them after the retention. None holds a pending row or a parked dead letter.
CREATE INDEX outbox_sent ON outbox (sent_at) WHERE sent_at IS NOT NULL;
CREATE INDEX outbox_parked ON outbox (id) WHERE parked_reason IS NOT NULL;
CREATE INDEX dead_letter_settled ON dead_letter (last_seen)
    WHERE status IN ('released', 'replayed', 'purged');
