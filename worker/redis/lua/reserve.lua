-- reserve.lua: hold a line's estimated cost against the batch's budget before it is bought.
--
-- KEYS[1]  the batch's counters ib:B:n
-- ARGV[1]  the estimate (in the budget's unit);  ARGV[2] the budget
-- Returns 1 and holds the amount, or 0 when it would take the batch over its budget.
-- A line that ends without spending gives its hold back (a negative 'reserved' count).

local held = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
if held + tonumber(ARGV[1]) > tonumber(ARGV[2]) + 1e-9 then return 0 end
redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', ARGV[1])
return 1
