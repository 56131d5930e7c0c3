-- sipedge schema, version 2: accounting for every call (issue #12 item 5). Until now a `cdr`
-- row was written for relayed calls only; from this version every initial INVITE that reaches
-- routing gets one (see README "Accounting"). The new columns are nullable (rows written by
-- version 1 have none of them), except `relayed`: every version-1 row is a relayed call.

ALTER TABLE cdr ADD COLUMN request_uri TEXT;
-- The `[[route]]` name, "location" (registered users), "foreign" (relay_foreign), "local".
ALTER TABLE cdr ADD COLUMN route TEXT;
-- The user proxy authentication verified, '' when the route asked for none.
ALTER TABLE cdr ADD COLUMN auth_user TEXT;
-- ip:port the INVITE came from.
ALTER TABLE cdr ADD COLUMN source TEXT;
-- answered | failed | cancelled
ALTER TABLE cdr ADD COLUMN outcome TEXT;
-- Who sent the BYE: caller | callee, '' otherwise.
ALTER TABLE cdr ADD COLUMN hangup TEXT;
ALTER TABLE cdr ADD COLUMN relayed BIGINT NOT NULL DEFAULT 1;
-- `sipedge cdr export --since`.
CREATE INDEX cdr_start ON cdr (start_ts);
