-- pump.lua: pick what one provider can do now, within its free slots and request budget.
--
-- KEYS[1]  ib:ready:P    READY lines by the time they may be submitted
-- KEYS[2]  ib:flight:P   lines holding P's slots, by when they next need a step
-- ARGV[1]  now (epoch s);  ARGV[2] lease (s) given to every line dispatched
-- ARGV[3]  the provider's current in-flight cap;  ARGV[4] requests that may be sent now
-- ARGV[5]  the line key format ("ib:%s:l:%s")
-- Due flight lines are polls (or a submit/poll whose worker died: their lease ran out); READY
-- lines become SUBMITTING and take a slot. When both want more requests than the budget
-- allows, each gets at least half, so polling never starves submits nor the reverse.
-- Every dispatched line gets a new seq (older messages become stale) and a lease: its score
-- moves to now + lease, so a dispatch that dies is picked up again when the lease runs out.
-- Returns {{member, seq, status}...}, {{member, seq}...}, in_flight, next flight due, next ready due.

local now, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local cap, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local inflight = redis.call('ZCARD', KEYS[2])
local free = math.max(0, cap - inflight)

local due, ready = {}, {}
if budget > 0 then
  due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, budget)
  if free > 0 then
    ready = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, math.min(free, budget))
  end
end
local np, ns = #due, #ready
if np + ns > budget then
  local half = math.floor(budget / 2)
  if np <= budget - half then ns = budget - np
  elseif ns <= half then np = budget - ns
  else np, ns = budget - half, half end
end

local function line_key(member)
  local b, i = string.match(member, '^(.*) (%d+)$')
  return string.format(ARGV[5], b, i)
end

local polls, submits = {}, {}
for j = 1, np do
  local m = due[j]
  local key = line_key(m)
  local seq = redis.call('HINCRBY', key, 'seq', 1)
  if seq == 1 then  -- no such line (its batch was purged): drop the orphan
    redis.call('DEL', key); redis.call('ZREM', KEYS[2], m)
  else
    redis.call('ZADD', KEYS[2], now + lease, m)
    polls[#polls + 1] = {m, seq, redis.call('HGET', key, 'status')}
  end
end
for j = 1, ns do
  local m = ready[j]
  local key = line_key(m)
  redis.call('ZREM', KEYS[1], m)
  local seq = redis.call('HINCRBY', key, 'seq', 1)
  if seq == 1 then
    redis.call('DEL', key)
  else
    redis.call('ZADD', KEYS[2], now + lease, m)
    redis.call('HSET', key, 'status', 'submitting')
    submits[#submits + 1] = {m, seq}
  end
end

local nf = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local nr = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {polls, submits, inflight + #submits, nf[2] or '', nr[2] or ''}
