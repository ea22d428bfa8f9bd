-- Which request made which password change: the edge re-sends a PUT whose upstream died after
-- committing (proxy_next_upstream), and the re-sent request must get the first one's answer, not
-- a 401 for a current password that has just changed. Written in the change's transaction.
CREATE TABLE password_change_requests (
    request_id text PRIMARY KEY,
    account_id uuid NOT NULL,
    event_id   uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX password_change_requests_created ON password_change_requests (created_at);
