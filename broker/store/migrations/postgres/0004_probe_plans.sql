-- Every statement of a batch's commit reads or writes its tables by primary or
-- unique key, one probe per row of the batch (a thousand at most), whatever
-- the tables' sizes. The planner does not always see it: on a fresh or fast-
-- growing table with stale statistics it hash-joined a batch's few instances
-- against every instance of the workflow (UPDATE saga ... FROM unnest: 999
-- rows read for 15, 0.34 ms a call at 1,000 msg/s, growing with the table).
-- Without hash and merge joins the only plan left is the nested loop of
-- index probes, for this function and what it calls.
ALTER FUNCTION q2c_commit_batch_v2(
    text, text[], date[], text[], text, text[], bigint[], bytea[], text[], text[],
    text[], bytea[], text[], text[], text[], double precision[], double precision,
    text[], text[], text[], text[], text[], bytea[], text[], integer[], text[], text[],
    text[], text[], text[], text[], text[], text[], text[], text[], text[], bytea[],
    text[], integer[], text[], text[], text[], text[], text[], text[], text[], text[],
    text[], text[], text[])
    SET enable_hashjoin = off
    SET enable_mergejoin = off;
