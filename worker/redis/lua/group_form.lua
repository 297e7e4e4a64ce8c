-- group_form.lua: a group provider's new group: a batch's due READY lines of one model, taken
-- out of READY at once, so a line is never in two groups nor sent alone.
--
-- KEYS[1]  the batch's READY lines for P     ib:B:ready:P
-- KEYS[2]  the new group's record            ib:B:g:G
-- KEYS[3]  the new group's lines             ib:B:gm:G
-- KEYS[4]  P's open groups                   ib:groups:P
-- KEYS[5]  the batch's open groups           ib:B:groups
-- KEYS[6]  P's queues (batches with READY lines for P)   ib:queues:P
-- ARGV[1]  now (epoch s);  ARGV[2] the batch;  ARGV[3] the group id;  ARGV[4] the provider
-- ARGV[5]  at most this many lines;  ARGV[6] at most this many bytes of input file, each line
--          counted as its request's JSON plus ARGV[7] bytes of framing
-- ARGV[8]  the line key format ("ib:%s:l:%s")
-- The first due line sets the group's model (one OpenAI batch runs one model); due lines of
-- other models stay READY for a later group. Each line taken gets a new seq (a stale task
-- copy can no longer touch it), status 'grouped' and the group's id. Returns the lines taken.

local now, b, g = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local most, budget, framing = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local model, bytes = nil, 0
local taken, orphans = {}, {}
local offset, full = 0, false
while not full and #taken < most do
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', offset, 500)
  if #due == 0 then break end
  offset = offset + #due
  for _, m in ipairs(due) do
    local idx = string.match(m, ' (%d+)$')
    local key = string.format(ARGV[8], b, idx)
    local line = redis.call('HMGET', key, 'status', 'request', 'attempt')
    if not line[1] then
      orphans[#orphans + 1] = m
    elseif line[1] == 'ready' then
      local mine = cjson.decode(line[2]).model or ''
      if model == nil then model = mine end
      if mine == model then
        local size = #line[2] + framing
        if #taken > 0 and bytes + size > budget then full = true; break end
        bytes = bytes + size
        taken[#taken + 1] = {m, key, idx, line[3] or '1'}
        if #taken >= most then break end
      end
    end
  end
end
for _, m in ipairs(orphans) do redis.call('ZREM', KEYS[1], m) end
if #taken == 0 then return 0 end

for _, t in ipairs(taken) do
  local seq = redis.call('HINCRBY', t[2], 'seq', 1)
  redis.call('HSET', t[2], 'status', 'grouped', 'group', g, 'settled', seq, 'owner', '')
  redis.call('HSET', KEYS[3], t[3], t[4])
  redis.call('ZREM', KEYS[1], t[1])
end
redis.call('HSET', KEYS[2], 'batch', b, 'provider', ARGV[4], 'model', model,
  'status', 'formed', 'size', #taken, 'seq', 1, 'owner', '', 'formed_at', ARGV[1])
redis.call('ZADD', KEYS[4], now, b .. ' ' .. g)
redis.call('SADD', KEYS[5], g)
if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('SREM', KEYS[6], b) end
return #taken
