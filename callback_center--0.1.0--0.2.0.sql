-- callback_center 0.1.0 -> 0.2.0, run by ALTER EXTENSION callback_center UPDATE.
--
-- The difference between the frozen callback_center--0.1.0.sql and what
-- src/sql/ installs today, written by hand as each change lands.  TAP test
-- 095_upgrade.pl checks that 0.1.0 plus this script gives a catalog equal to
-- a fresh install of 0.2.0, and that the data of 0.1.0 keeps working.
--
-- Rules for whoever adds to it:
--   * every function whose definition changed in src/sql/ is re-created here
--     (CREATE OR REPLACE, or DROP and CREATE when its signature changed),
--     with the same grants;
--   * new columns are added with ALTER TABLE ... ADD COLUMN, so in src/sql/
--     they go last in their CREATE TABLE (a fresh install and an upgraded one
--     keep the same column order);
--   * a C function whose behaviour needs the 0.2.0 schema gets a new C
--     symbol (name_v2); the old symbol stays in the library and refuses with
--     a hint to run this script, as pg_stat_statements does across versions.
\echo Use "ALTER EXTENSION callback_center UPDATE TO '0.2.0'" to load this file. \quit

-- Destinations and text from outside: endpoint URLs are checked by the URL
-- parser the delivery itself uses (libcurl's, in C) instead of regular
-- expressions, and against the new default destination rules (reserved
-- addresses refused unless listed).  _check_destination keeps its C symbol.
CREATE OR REPLACE FUNCTION callback_center._check_url(url text)
RETURNS text
AS 'MODULE_PATHNAME', 'cc_check_url'
LANGUAGE C STABLE;
REVOKE ALL ON FUNCTION callback_center._check_url(text) FROM PUBLIC;
