-- limit.lua: a provider answered 429; count it for the controller (the leader's, which
-- decides the rates from the share of 429s, not from each one) and, for a concurrency 429,
-- cut the cap at once: the provider counted our jobs, so more submits now would only be
-- refused too.
--
-- KEYS[1]  ib:limit:P
-- ARGV[1]  the request kind refused: "submit" or "poll"
-- ARGV[2]  the cap the refusal shows (what the provider names, else what we had in flight),
--          or "" for a rate 429
-- ARGV[3]  the Retry-After it asked for (s), or ""
-- Returns the cap after it.

local kind = ARGV[1]
redis.call('HINCRBY', KEYS[1], 'throttled', 1)
if ARGV[2] ~= '' then
  redis.call('HINCRBY', KEYS[1], 'concurrency_throttled', 1)
  local cap = tonumber(redis.call('HGET', KEYS[1], 'cap'))
  local shown = math.max(1, tonumber(ARGV[2]))
  if cap == nil or shown < cap then redis.call('HSET', KEYS[1], 'cap', shown) end
else
  redis.call('HINCRBY', KEYS[1], kind .. '_throttled', 1)
end
if ARGV[3] ~= '' then
  local field = kind .. '_retry_after'
  local seen = tonumber(redis.call('HGET', KEYS[1], field)) or 0
  if tonumber(ARGV[3]) > seen then redis.call('HSET', KEYS[1], field, ARGV[3]) end
end
return tonumber(redis.call('HGET', KEYS[1], 'cap')) or -1
