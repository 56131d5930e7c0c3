-- sipedge schema, version 4 (3 is reserved): several instances sharing one PostgreSQL
-- (issue #14, README "Several instances").
-- Each instance's SIP address and liveness: `server.instance_id` → the address other instances
-- forward requests for its bindings to, and the last heartbeat (unix seconds; an instance
-- whose heartbeat is older than 30 s is taken for dead and its bindings are not used).
CREATE TABLE instance (
    id        {key:255} NOT NULL PRIMARY KEY,
    address   TEXT   NOT NULL,
    heartbeat BIGINT NOT NULL
){table};
-- The instance that wrote the call record ('' for rows written before version 4).
ALTER TABLE cdr ADD COLUMN instance TEXT;
