-- claim.lua: take the due lines of one zset for dispatch (the store steps and their retries).
--
-- KEYS[1]  the zset (ib:store)
-- ARGV[1]  now (epoch s);  ARGV[2] lease (s);  ARGV[3] at most this many;  ARGV[4] line key format
-- Each claimed line gets a new seq and its score moves to now + lease (taken again if its
-- worker dies). Returns {{member, seq}...}, next due.

local now, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, m in ipairs(due) do
  local b, i = string.match(m, '^(.*) (%d+)$')
  local key = string.format(ARGV[4], b, i)
  local seq = redis.call('HINCRBY', key, 'seq', 1)
  if seq == 1 then
    redis.call('DEL', key); redis.call('ZREM', KEYS[1], m)
  else
    redis.call('ZADD', KEYS[1], now + lease, m)
    out[#out + 1] = {m, seq}
  end
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {out, nxt[2] or ''}
