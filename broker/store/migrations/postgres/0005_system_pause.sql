-- Systems an operator paused (brokerctl pause): every daemon's system actor for
-- the system stops taking commands while its row is here, and takes them again
-- once it is gone. One row per system; pausing again updates the reason.
CREATE TABLE system_pause (
    system      text        PRIMARY KEY,
    reason      text        NOT NULL DEFAULT '',
    paused_by   text        NOT NULL DEFAULT '',
    since       timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
