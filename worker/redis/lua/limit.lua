-- limit.lua: a provider answered 429; slow every worker down (multiplicative decrease).
--
-- KEYS[1]  ib:limit:P
-- ARGV[1]  "concurrency" (too many jobs at once) or "rate" (too many requests)
-- ARGV[2]  now;  ARGV[3] Retry-After (s);  ARGV[4] our other jobs in flight when it was refused
-- ARGV[5]  the configured cap (ceiling);  ARGV[6] the configured rate (ceiling);  ARGV[7] floor rate
-- A concurrency 429 means the provider was already running all it allows of ours: the cap
-- becomes that number. A rate 429 cuts the request rate by 30 %, at most once per second
-- (a burst of 429s from one overshoot is one signal, not many). Every 429 pauses all
-- requests to P until its Retry-After has passed. Returns {cap, rate}.

local now = tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'cap', 'rate', 'pause_until', 'decreased_at')
local cap = tonumber(s[1]) or tonumber(ARGV[5])
local rate = tonumber(s[2]) or tonumber(ARGV[6])
local pause = math.max(tonumber(s[3]) or 0, now + tonumber(ARGV[3]))
local last = tonumber(s[4]) or 0
local acted = false
if ARGV[1] == 'concurrency' then
  local lower = math.max(1, math.min(cap, tonumber(ARGV[4])))
  acted = lower < cap
  cap = lower
elseif now - last >= 1 then
  rate = math.max(tonumber(ARGV[7]), rate * 0.7)
  acted = true
end
redis.call('HSET', KEYS[1], 'cap', cap, 'rate', tostring(rate), 'pause_until', tostring(pause))
-- Only a decrease starts the clock: 429s that change nothing (within the second, or a cap
-- already that low) must not keep postponing the next cut, nor the next raise.
if acted then redis.call('HSET', KEYS[1], 'decreased_at', tostring(now)) end
redis.call('HINCRBY', KEYS[1], 'throttled', 1)
return {cap, tostring(rate)}
