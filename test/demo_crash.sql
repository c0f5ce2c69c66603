-- Scenario F of the demo: after kill -9 and the restart, every event of the
-- burst is delivered or dead; none is lost.
\pset footer off
\set QUIET on
SELECT count(*) AS events, count(*) FILTER (WHERE status = 'delivered') AS delivered,
       count(*) FILTER (WHERE status = 'dead') AS dead,
       count(*) FILTER (WHERE status NOT IN ('delivered', 'dead')) AS lost_or_waiting
  FROM callback_center.outbox WHERE aggregate_id LIKE 'crash-%';
