-- Flagging an account (breach response), a sign-in rehash and a password change update columns
-- that no index covers: leave room on each page so those updates stay HOT (no index writes).
ALTER TABLE accounts SET (fillfactor = 85);
