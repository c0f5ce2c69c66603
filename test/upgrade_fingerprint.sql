-- A catalog fingerprint of the installed callback_center: one line per fact
-- about every extension member, free of OIDs and of the order in which
-- objects were created, so that an upgraded database and a fresh install
-- can be compared line by line (test/t/095_upgrade.pl).  Column order is
-- kept on purpose: SELECT * must read the same after an upgrade.
WITH ext AS (
    SELECT oid, extconfig, extcondition FROM pg_catalog.pg_extension
     WHERE extname = 'callback_center'
), member AS (
    SELECT d.classid, d.objid FROM pg_catalog.pg_depend d, ext
     WHERE d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
       AND d.refobjid = ext.oid AND d.deptype = 'e'
), acl(kind, name, acl) AS (
    -- ACLs as sorted grantee/privilege lists, not in creation order
    SELECT 'acl', pg_catalog.format('%s %s', x.k, x.n),
           (SELECT pg_catalog.string_agg(g.p, ',' ORDER BY g.p)
              FROM (SELECT pg_catalog.format('%s:%s:%s',
                           CASE WHEN e.grantee = 0 THEN 'PUBLIC' ELSE e.grantee::regrole::text END,
                           e.privilege_type, e.is_grantable) AS p
                      FROM pg_catalog.aclexplode(x.a) e) g)
      FROM (SELECT 'function' AS k, p.oid::regprocedure::text AS n, p.proacl AS a
              FROM pg_catalog.pg_proc p JOIN member m ON m.classid = 'pg_catalog.pg_proc'::regclass AND m.objid = p.oid
            UNION ALL
            SELECT 'relation', c.oid::regclass::text, c.relacl
              FROM pg_catalog.pg_class c JOIN member m ON m.classid = 'pg_catalog.pg_class'::regclass AND m.objid = c.oid
            UNION ALL
            SELECT 'column', pg_catalog.format('%s.%s', c.oid::regclass, a.attname), a.attacl
              FROM pg_catalog.pg_class c JOIN member m ON m.classid = 'pg_catalog.pg_class'::regclass AND m.objid = c.oid
              JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             WHERE a.attacl IS NOT NULL
            UNION ALL
            SELECT 'schema', n.nspname::text, n.nspacl
              FROM pg_catalog.pg_namespace n JOIN member m ON m.classid = 'pg_catalog.pg_namespace'::regclass AND m.objid = n.oid
            UNION ALL
            SELECT 'type', t.oid::regtype::text, t.typacl
              FROM pg_catalog.pg_type t JOIN member m ON m.classid = 'pg_catalog.pg_type'::regclass AND m.objid = t.oid) x
)
SELECT line FROM (
    -- every member, whatever its kind
    SELECT pg_catalog.format('member|%s', pg_catalog.pg_describe_object(m.classid, m.objid, 0)) AS line
      FROM member m
    UNION ALL
    -- functions: the whole definition (arguments, result, language,
    -- volatility, strictness, security, SET options, body) and owner
    SELECT pg_catalog.format('function|%s|%s|%s', p.oid::regprocedure,
               CASE WHEN p.prokind = 'a' THEN 'aggregate' ELSE pg_catalog.pg_get_functiondef(p.oid) END,
               p.proowner::regrole)
      FROM pg_catalog.pg_proc p JOIN member m ON m.classid = 'pg_catalog.pg_proc'::regclass AND m.objid = p.oid
    UNION ALL
    SELECT pg_catalog.format('%s|%s|%s', a.kind, a.name, a.acl) FROM acl a
    UNION ALL
    -- the initial privileges pg_dump compares ACLs with: a difference here
    -- would make a dump of one restore wrongly into the other
    SELECT pg_catalog.format('init_privs|%s|%s|%s',
               pg_catalog.pg_describe_object(i.classoid, i.objoid, i.objsubid), i.privtype,
               (SELECT pg_catalog.string_agg(g.p, ',' ORDER BY g.p)
                  FROM (SELECT pg_catalog.format('%s:%s:%s',
                               CASE WHEN e.grantee = 0 THEN 'PUBLIC' ELSE e.grantee::regrole::text END,
                               e.privilege_type, e.is_grantable) AS p
                          FROM pg_catalog.aclexplode(i.initprivs) e) g))
      FROM pg_catalog.pg_init_privs i
      JOIN member m ON m.classid = i.classoid AND m.objid = i.objoid
    UNION ALL
    -- relations: kind, persistence, options, row security, owner
    SELECT pg_catalog.format('relation|%s|%s|%s|%s|%s/%s|%s|%s', c.oid::regclass, c.relkind,
               c.relpersistence, c.reloptions, c.relrowsecurity, c.relforcerowsecurity,
               c.relreplident, c.relowner::regrole)
      FROM pg_catalog.pg_class c JOIN member m ON m.classid = 'pg_catalog.pg_class'::regclass AND m.objid = c.oid
    UNION ALL
    -- columns in their order, with type, nullability, default, identity,
    -- generation, collation, storage and options
    SELECT pg_catalog.format('column|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s',
               c.oid::regclass, a.attnum OPERATOR(pg_catalog.-) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute d
                                        WHERE d.attrelid = c.oid AND d.attisdropped AND d.attnum < a.attnum),
               a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), a.attidentity, a.attgenerated,
               co.collname, a.attstorage,
               (SELECT pg_catalog.array_agg(o) FROM pg_catalog.unnest(a.attoptions) o
                 WHERE o NOT LIKE 'pg\_attver=%'))
      FROM pg_catalog.pg_class c JOIN member m ON m.classid = 'pg_catalog.pg_class'::regclass AND m.objid = c.oid
      JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
      LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation AND a.attcollation <> 0
    UNION ALL
    -- constraints of tables and domains
    SELECT pg_catalog.format('constraint|%s|%s|%s|%s', coalesce(r.conrelid::regclass::text, r.contypid::regtype::text),
               r.conname, pg_catalog.pg_get_constraintdef(r.oid), r.condeferrable)
      FROM pg_catalog.pg_constraint r
     WHERE r.conrelid IN (SELECT objid FROM member WHERE classid = 'pg_catalog.pg_class'::regclass)
        OR r.contypid IN (SELECT objid FROM member WHERE classid = 'pg_catalog.pg_type'::regclass)
    UNION ALL
    -- indexes, with their options
    SELECT pg_catalog.format('index|%s|%s|%s', i.indrelid::regclass, pg_catalog.pg_get_indexdef(i.indexrelid),
               (SELECT x.reloptions FROM pg_catalog.pg_class x WHERE x.oid = i.indexrelid))
      FROM pg_catalog.pg_index i
     WHERE i.indrelid IN (SELECT objid FROM member WHERE classid = 'pg_catalog.pg_class'::regclass)
    UNION ALL
    -- triggers and whether they fire
    SELECT pg_catalog.format('trigger|%s|%s|%s', t.tgrelid::regclass, pg_catalog.pg_get_triggerdef(t.oid), t.tgenabled)
      FROM pg_catalog.pg_trigger t
     WHERE NOT t.tgisinternal
       AND t.tgrelid IN (SELECT objid FROM member WHERE classid = 'pg_catalog.pg_class'::regclass)
    UNION ALL
    -- row-level security policies
    SELECT pg_catalog.format('policy|%s|%s|%s|%s|%s|%s|%s', p.polrelid::regclass, p.polname, p.polcmd,
               p.polpermissive, p.polroles::regrole[], pg_catalog.pg_get_expr(p.polqual, p.polrelid),
               pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid))
      FROM pg_catalog.pg_policy p
     WHERE p.polrelid IN (SELECT objid FROM member WHERE classid = 'pg_catalog.pg_class'::regclass)
    UNION ALL
    -- views
    SELECT pg_catalog.format('view|%s|%s', c.oid::regclass, pg_catalog.pg_get_viewdef(c.oid))
      FROM pg_catalog.pg_class c JOIN member m ON m.classid = 'pg_catalog.pg_class'::regclass AND m.objid = c.oid
     WHERE c.relkind IN ('v', 'm')
    UNION ALL
    -- rules other than views' own
    SELECT pg_catalog.format('rule|%s|%s', r.ev_class::regclass, pg_catalog.pg_get_ruledef(r.oid))
      FROM pg_catalog.pg_rewrite r
     WHERE r.rulename <> '_RETURN'
       AND r.ev_class IN (SELECT objid FROM member WHERE classid = 'pg_catalog.pg_class'::regclass)
    UNION ALL
    -- sequences: parameters and the column that owns them
    SELECT pg_catalog.format('sequence|%s|%s|%s|%s|%s|%s|%s|%s|%s', s.seqrelid::regclass,
               s.seqtypid::regtype, s.seqstart, s.seqincrement, s.seqmax, s.seqmin, s.seqcache, s.seqcycle,
               (SELECT pg_catalog.format('%s.%s', d.refobjid::regclass, a.attname)
                  FROM pg_catalog.pg_depend d
                  JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                 WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = s.seqrelid
                   AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.deptype IN ('a', 'i')))
      FROM pg_catalog.pg_sequence s
     WHERE s.seqrelid IN (SELECT objid FROM member WHERE classid = 'pg_catalog.pg_class'::regclass)
        OR s.seqrelid IN (SELECT d.objid FROM pg_catalog.pg_depend d
                           WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.deptype = 'i'
                             AND d.refobjid IN (SELECT objid FROM member WHERE classid = 'pg_catalog.pg_class'::regclass))
    UNION ALL
    -- types: kind, enum labels in order, domain base, composite attributes
    SELECT pg_catalog.format('type|%s|%s|%s|%s|%s', t.oid::regtype, t.typtype,
               (SELECT pg_catalog.string_agg(e.enumlabel::text, ',' ORDER BY e.enumsortorder)
                  FROM pg_catalog.pg_enum e WHERE e.enumtypid = t.oid),
               CASE WHEN t.typtype = 'd' THEN pg_catalog.format_type(t.typbasetype, t.typtypmod) END,
               t.typdefault)
      FROM pg_catalog.pg_type t JOIN member m ON m.classid = 'pg_catalog.pg_type'::regclass AND m.objid = t.oid
    UNION ALL
    -- comments on members and their columns
    SELECT pg_catalog.format('comment|%s|%s', pg_catalog.pg_describe_object(d.classoid, d.objoid, d.objsubid), d.description)
      FROM pg_catalog.pg_description d
     WHERE (d.classoid, d.objoid) IN (SELECT classid, objid FROM member)
    UNION ALL
    -- what pg_dump dumps of the configuration tables, and under which condition
    SELECT pg_catalog.format('dump|%s|%s', c.oid::regclass, x.cond)
      FROM ext, LATERAL ROWS FROM (pg_catalog.unnest(ext.extconfig), pg_catalog.unnest(ext.extcondition)) AS x(rel, cond)
      JOIN pg_catalog.pg_class c ON c.oid = x.rel
) f
ORDER BY line COLLATE "C";
