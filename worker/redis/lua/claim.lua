-- claim.lua: take the due members of one zset for dispatch: the store steps and their
-- retries (ib:store, members "BATCH IDX"), or a group provider's due groups, for their next
-- step: send, create, poll, collect (ib:groups:P, members "BATCH GROUP").
--
-- KEYS[1]  the zset
-- ARGV[1]  now (epoch s);  ARGV[2] lease (s);  ARGV[3] at most this many
-- ARGV[4]  the member's record key format ("ib:%s:l:%s" for a line, "ib:%s:g:%s" for a group)
-- Each claimed member gets a new seq (an older task copy is stale) and its score moves to
-- now + lease (claimed again if its worker dies; a live task keeps it renewed). A member
-- whose record is gone (its batch was purged) is dropped. Returns {{member, seq}...}, next due.

local now, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, m in ipairs(due) do
  local b, id = string.match(m, '^(.*) (%S+)$')
  local key = string.format(ARGV[4], b, id)
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
