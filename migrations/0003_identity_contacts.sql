-- sipedge schema, version 3: caller identity and how a binding is reached (issue #13 items 5
-- and 6; README "Caller identity" and "Which address a contact is reached at").

-- The number asserted for this subscriber in P-Asserted-Identity / Remote-Party-ID on routes
-- with `identity`; NULL = none set (the username is asserted). Nullable: MySQL gives TEXT no
-- literal default.
ALTER TABLE subscriber ADD COLUMN caller_id TEXT;
-- 1 when nathelper's tests said the REGISTER came through NAT (private Contact, or Via sent-by
-- other than the source): the binding is reached at `received`; 0: at its Contact URI.
-- Bindings written before version 3 were all reached at `received`.
ALTER TABLE location ADD COLUMN nated BIGINT NOT NULL DEFAULT 1;
