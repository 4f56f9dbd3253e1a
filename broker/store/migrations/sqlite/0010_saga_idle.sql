-- Finished instances go after [core] finished-retention-days without a change
-- (broker/app.py, the maintenance actor): it pages through a workflow's
-- instances idle since before the cut-off, oldest first, by this index.
CREATE INDEX saga_idle ON saga (workflow, updated_at, correlation_id);
