-- sipedge schema, version 1. Portable between SQLite, PostgreSQL and MySQL/MariaDB: TEXT,
-- BIGINT and DOUBLE PRECISION only; times are unix seconds. {key:N} is a text column that is
-- part of a key (TEXT, or VARCHAR(N) on MySQL, which cannot index TEXT); {table} ends each
-- CREATE TABLE (MySQL: InnoDB, utf8mb4, exact binary comparison). See src/store/dialect.rs.

CREATE TABLE subscriber (
    username    {key:255} NOT NULL,
    domain      {key:255} NOT NULL,
    -- HA1 = H(username:realm:password); the plaintext password is never stored.
    ha1_md5     TEXT   NOT NULL,
    ha1_sha256  TEXT   NOT NULL,
    created     BIGINT NOT NULL,
    PRIMARY KEY (username, domain)
){table};

CREATE TABLE location (
    aor          {key:255} NOT NULL,  -- user@domain
    contact      {key:512} NOT NULL,  -- the Contact URI as the phone sent it
    received     TEXT             NOT NULL,  -- ip:port the REGISTER came from (the NAT binding)
    transport    TEXT             NOT NULL,  -- UDP | TCP
    local_socket TEXT             NOT NULL,  -- our ip:port it arrived on
    instance     TEXT             NOT NULL,  -- server.instance_id owning the binding
    expires      BIGINT           NOT NULL,
    q            DOUBLE PRECISION NOT NULL,
    call_id      TEXT             NOT NULL,
    cseq         BIGINT           NOT NULL,
    user_agent   TEXT             NOT NULL,
    path         TEXT             NOT NULL,
    instance_urn TEXT             NOT NULL,  -- +sip.instance of RFC 5626, '' when absent
    updated      BIGINT           NOT NULL,
    PRIMARY KEY (aor, contact)
){table};
CREATE INDEX location_expires ON location (expires);

CREATE TABLE cdr (
    call_id          {key:512} NOT NULL,
    from_uri         TEXT             NOT NULL,
    to_uri           TEXT             NOT NULL,
    start_ts         BIGINT           NOT NULL,
    answer_ts        BIGINT,
    end_ts           BIGINT,
    status           BIGINT           NOT NULL,
    reason           TEXT             NOT NULL,
    caller_pkts      BIGINT           NOT NULL DEFAULT 0,
    caller_bytes     BIGINT           NOT NULL DEFAULT 0,
    caller_lost      BIGINT           NOT NULL DEFAULT 0,
    caller_jitter_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
    callee_pkts      BIGINT           NOT NULL DEFAULT 0,
    callee_bytes     BIGINT           NOT NULL DEFAULT 0,
    callee_lost      BIGINT           NOT NULL DEFAULT 0,
    callee_jitter_ms DOUBLE PRECISION NOT NULL DEFAULT 0
){table};
CREATE INDEX cdr_call_id ON cdr (call_id);

-- Per-install values, e.g. the nonce secret.
CREATE TABLE meta (
    "key" {key:255} NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
){table};
