-- Keys from outside are bounded (200 bytes): a huge biz id or SKU id is a
-- clear 22023 with nothing written, never an index row too large (54000).
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

CREATE FUNCTION pg_temp.try(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE q;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;

SELECT callback_center.set_stock('key-a', 10) IS NOT NULL AS stocked;
SELECT pg_temp.try($$SELECT callback_center.deduct_stock(repeat('b', 1000000), 'key-a', 1)$$);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('key-o1', repeat('s', 1000000), 1)$$);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock(repeat('b', 201), ARRAY['key-a'], ARRAY[1::bigint])$$);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock(repeat('b', 1000000),
    jsonb_build_array(jsonb_build_object('sku', 'key-a', 'qty', 1)))$$);
-- 200 bytes is still a key
SELECT pg_temp.try($$SELECT callback_center.deduct_stock(repeat('b', 200), 'key-a', 1)$$);
SELECT available FROM callback_center.stock WHERE sku_id = 'key-a';
SELECT count(*) AS records FROM callback_center.stock_deductions WHERE sku_id = 'key-a';
-- a new SKU's id too
SELECT pg_temp.try($$SELECT callback_center.set_stock(repeat('s', 1000000), 1)$$);
SELECT pg_temp.try($$SELECT callback_center.set_stock('', 1)$$);
-- state and event names too (machine and endpoint names are at most 63 bytes)
SELECT callback_center.create_state_machine('key-m');
SELECT pg_temp.try($$SELECT callback_center.add_state('key-m', repeat('s', 201), true)$$);
SELECT callback_center.add_state('key-m', 'a', true), callback_center.add_state('key-m', 'b');
SELECT pg_temp.try($$SELECT callback_center.add_transition('key-m', 'a', 'b', repeat('e', 201))$$);
SELECT pg_temp.try($$SELECT callback_center.add_transition('key-m', 'a', 'b', 'go', ARRAY[repeat('x', 201)])$$);
SELECT pg_temp.try($$SELECT callback_center.create_state_machine(repeat('m', 64))$$);
SELECT pg_temp.try($$SELECT callback_center.create_endpoint(repeat('n', 64), 'https://a.example/h', '{*}')$$);
