-- health.lua: one submit's verdict on its provider, for the breaker every worker shares.
--
-- KEYS[1]  ib:health:P  failures (in a row), until (cooling down until), probe (a probe line
--                       is out until), trips (cooldowns in a row: each one lasts twice the last)
-- ARGV[1]  now;  ARGV[2] "1" the provider answered, "0" it failed (5xx, timeout, refused)
-- ARGV[3]  failures in a row that start a cooldown;  ARGV[4] the first cooldown (s);
-- ARGV[5]  the longest cooldown (s)
-- A failure while cooled down but not yet proven (the probe's, or a late one) starts the next,
-- longer cooldown at once; an answer ends it. Returns "cooling <until>" when a cooldown
-- starts, "healthy" when an answer ends one, "" otherwise.

local now = tonumber(ARGV[1])
local h = redis.call('HMGET', KEYS[1], 'failures', 'until', 'trips')
local failures, cool_until, trips = tonumber(h[1]) or 0, tonumber(h[2]) or 0, tonumber(h[3]) or 0
if ARGV[2] == '1' then
  if failures == 0 and cool_until == 0 then return '' end
  redis.call('DEL', KEYS[1])
  if cool_until > 0 then return 'healthy' end
  return ''
end
if cool_until > now then return '' end  -- lines sent before the cooldown, failing late
failures = failures + 1
if cool_until > 0 or failures >= tonumber(ARGV[3]) then
  local wait = math.min(tonumber(ARGV[5]), tonumber(ARGV[4]) * 2 ^ trips)
  redis.call('HSET', KEYS[1], 'failures', 0, 'until', tostring(now + wait), 'probe', 0,
    'trips', trips + 1)
  redis.call('EXPIRE', KEYS[1], math.ceil(wait + 3600))
  return 'cooling ' .. tostring(now + wait)
end
redis.call('HSET', KEYS[1], 'failures', failures)
redis.call('EXPIRE', KEYS[1], 3600)
return ''
