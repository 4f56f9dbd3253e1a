-- Per-system rate limits shared by every daemon on this store (DESIGN §9): one
-- token bucket per external system. q2c_take_tokens refills it by the time
-- passed on the database's clock, at most to the burst, and grants up to the
-- tokens asked for, under the row's lock: daemons taking at once never share a
-- token. broker/store/ratebuckets.py has the same arithmetic for SQLite.
CREATE TABLE rate_bucket (
    system  text             PRIMARY KEY,
    tokens  double precision NOT NULL,
    at      timestamptz      NOT NULL
);

CREATE FUNCTION q2c_take_tokens(
    p_system text,
    p_want   integer,
    p_rate   double precision,
    p_burst  double precision,
    OUT granted integer,
    OUT wait_s  double precision
) LANGUAGE plpgsql AS $$
DECLARE
    left_   double precision;
    last    timestamptz;
    t       timestamptz;
    avail   double precision;
BEGIN
    INSERT INTO rate_bucket (system, tokens, at)
    VALUES (p_system, p_burst, clock_timestamp())
    ON CONFLICT (system) DO NOTHING;
    SELECT b.tokens, b.at INTO left_, last
      FROM rate_bucket b WHERE b.system = p_system FOR UPDATE;
    -- Read the clock once the lock is held, so that the refill never counts
    -- time another daemon's grant already counted.
    t := greatest(clock_timestamp(), last);
    avail := least(p_burst, left_ + extract(epoch FROM t - last) * p_rate);
    granted := greatest(0, least(p_want, floor(avail)))::integer;
    UPDATE rate_bucket SET tokens = avail - granted, at = t WHERE system = p_system;
    wait_s := CASE WHEN granted > 0 THEN 0 ELSE (1 - avail) / p_rate END;
END
$$;
