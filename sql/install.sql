-- CREATE EXTENSION brings pgcrypto; DROP EXTENSION leaves nothing behind.
-- Start from a database without either extension, whatever ran before.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS callback_center CASCADE;
DROP EXTENSION IF EXISTS pgcrypto CASCADE;
RESET client_min_messages;
CREATE EXTENSION callback_center CASCADE;
SELECT extname, extversion FROM pg_extension ORDER BY extname;
-- The schema and the functions are members, so DROP EXTENSION takes them.
SELECT count(*) FILTER (WHERE classid = 'pg_namespace'::regclass) AS schemas,
       count(*) FILTER (WHERE classid = 'pg_proc'::regclass) > 0 AS has_functions
  FROM pg_depend
 WHERE refclassid = 'pg_extension'::regclass
   AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'callback_center')
   AND deptype = 'e';

DROP EXTENSION callback_center;
SELECT count(*) AS schemas FROM pg_namespace WHERE nspname = 'callback_center';
SELECT count(*) AS functions FROM pg_proc WHERE probin LIKE '%callback_center%';
SELECT count(*) AS dependents FROM pg_depend d
 WHERE NOT EXISTS (SELECT 1 FROM pg_extension e WHERE e.oid = d.refobjid)
   AND d.refclassid = 'pg_extension'::regclass;
-- pgcrypto stays: it may serve others.
SELECT extname FROM pg_extension ORDER BY extname;

-- The wrong way round: pgcrypto cannot go while we depend on it.
CREATE EXTENSION callback_center;
DROP EXTENSION pgcrypto;
DROP EXTENSION callback_center;
DROP EXTENSION pgcrypto;
-- Without CASCADE the prerequisite is named.
CREATE EXTENSION callback_center;
CREATE EXTENSION callback_center CASCADE;
SELECT pid IS NOT NULL AS worker_visible FROM callback_center.worker_status();

-- Every released version installs and updates to the current one (the
-- catalog comparison and the data live in TAP test 095_upgrade).
SELECT source, target, path FROM pg_extension_update_paths('callback_center')
 WHERE path IS NOT NULL ORDER BY source, target;
DROP EXTENSION callback_center;
CREATE EXTENSION callback_center VERSION '0.1.0';
SELECT extversion FROM pg_extension WHERE extname = 'callback_center';
ALTER EXTENSION callback_center UPDATE;
SELECT extversion FROM pg_extension WHERE extname = 'callback_center';
SELECT pid IS NOT NULL AS worker_visible FROM callback_center.worker_status();
