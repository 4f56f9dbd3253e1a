-- Partition upkeep is DDL, and the daemon may run as a role without any
-- (RELIABILITY.md §6.2: an owner role runs the migrations, the daemon's role
-- has DML only). As SECURITY DEFINER functions owned by the schema owner,
-- the two partition functions run with the owner's rights; EXECUTE on them is
-- granted to the daemon's role by the operator, not to PUBLIC. The search
-- path is fixed to the one these migrations ran with.
ALTER FUNCTION q2c_ensure_partitions(text, date, date)
    SECURITY DEFINER SET search_path FROM CURRENT;
ALTER FUNCTION q2c_drop_partitions(text, date)
    SECURITY DEFINER SET search_path FROM CURRENT;
REVOKE EXECUTE ON FUNCTION q2c_ensure_partitions(text, date, date) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION q2c_drop_partitions(text, date) FROM PUBLIC;
