-- apply.lua: apply one step's transition to a line, atomically, if the step is still current.
--
-- KEYS[1]  the line's hash                      ib:B:l:I
-- KEYS[2]  the zset the line waits in now       ib:B:ready:P | ib:flight:P | ib:store | "-"
-- KEYS[3]  the zset it waits in next            (same choices)
-- KEYS[4]  the batch's counters                 ib:B:n
-- KEYS[5]  the batch's unflushed rows           ib:B:rows
-- KEYS[6]  the scheduler's wake list            ib:wake
-- KEYS[7]  (unused: kept so callers pass the batch record's key) ib:B
-- KEYS[8]  the provider's job index             ib:jobs:P | "-"
-- KEYS[9]  the learned latency                  ib:latency:P:M | "-"
-- KEYS[10] where the line's READY queue is registered when it goes back to READY: its
--          provider's ib:queues:P (member B), ib:pools for a pool's (member B@a,b) | "-"
-- KEYS[11] when the scheduler means to look again      ib:wake:at
-- ARGV[1]  the seq the step ran under (a stale copy's seq no longer matches: nothing happens)
-- ARGV[2]  the line's member "B I";  ARGV[3] the new status;  ARGV[4] due time (epoch s)
-- ARGV[5]  "1" when the new status is terminal;  ARGV[6] its row (JSON);  ARGV[7] the line index
-- ARGV[8]  job index change: "" | "set:<job id>" | "del:<job id>"
-- ARGV[9]  latency sample in seconds, then (space-separated) the job's queue share, or ""
-- ARGV[10] an event for the scheduler besides 'line' (e.g. 'store': a store is due now), or ""
-- ARGV[11] the status the step read: a transition decided from a status the line has since
--          left (a second copy of a poll landing after the first moved the line on) is stale
-- ARGV[12] n, the number of field pairs, then n field/value pairs,
--          then m, the number of counter pairs, then m counter/amount pairs,
--          then k, the number of extra keys to delete (inline image blobs), then k keys,
--          then the batch's line count (to tell the caller the batch's last line ended).
-- Returns {applied (1/0), done, total}: done == total means the batch's last line just ended.

local line = redis.call('HMGET', KEYS[1], 'seq', 'status')
if line[1] ~= ARGV[1] or line[2] ~= ARGV[11] then return {0, 0, -1} end

local member, score = ARGV[2], tonumber(ARGV[4])
if KEYS[2] ~= KEYS[3] and KEYS[2] ~= '-' then redis.call('ZREM', KEYS[2], member) end
if KEYS[3] ~= '-' then redis.call('ZADD', KEYS[3], score, member) end
if KEYS[10] ~= '-' then
  local pool = string.match(KEYS[3], ':ready:(@.*)$') or ''
  redis.call('SADD', KEYS[10], string.match(member, '^(.*) %d+$') .. pool)
end
local wake = KEYS[2] ~= KEYS[3] and string.find(KEYS[2], ':flight:', 1, true) ~= nil
-- A poll due before the sleeping scheduler means to look again (planned for a job's end a
-- moment away): wake it, or the line waits for that look. (Lines going back to READY do not:
-- a group provider's come back one by one and are grouped on the scheduler's next look.)
local early = not wake and string.find(KEYS[3], ':flight:', 1, true) ~= nil
  and score < (tonumber(redis.call('GET', KEYS[11])) or 0)

local i = 12
local nfields = tonumber(ARGV[i]); i = i + 1
local hset = {}
for _ = 1, nfields do
  hset[#hset + 1] = ARGV[i]; hset[#hset + 1] = ARGV[i + 1]; i = i + 2
end
local ncounts = tonumber(ARGV[i]); i = i + 1
for _ = 1, ncounts do
  redis.call('HINCRBYFLOAT', KEYS[4], ARGV[i], ARGV[i + 1]); i = i + 2
end
local ndel = tonumber(ARGV[i]); i = i + 1
for _ = 1, ndel do redis.call('DEL', ARGV[i]); i = i + 1 end
local line_count = tonumber(ARGV[i]) or -1

if KEYS[8] ~= '-' and ARGV[8] ~= '' then
  local op, job = string.sub(ARGV[8], 1, 3), string.sub(ARGV[8], 5)
  if op == 'set' then redis.call('HSET', KEYS[8], job, member) else redis.call('HDEL', KEYS[8], job) end
end

if KEYS[9] ~= '-' and ARGV[9] ~= '' then
  -- A running estimate of the job latency's upper middle: mean plus half the mean deviation,
  -- each an exponentially weighted average (recent jobs count most).
  local xs, qs = string.match(ARGV[9], '^(%S+) ?(%S*)$')
  local x = tonumber(xs)
  local s = redis.call('HMGET', KEYS[9], 'mean', 'dev', 'n', 'queue', 'queued')
  local n = tonumber(s[3]) or 0
  local mean, dev = tonumber(s[1]) or x, tonumber(s[2]) or 0
  local a = math.max(0.05, 1 / (n + 1))
  if n > 0 then
    dev = dev + a * (math.abs(x - mean) - dev)
    mean = mean + a * (x - mean)
  end
  redis.call('HSET', KEYS[9], 'mean', tostring(mean), 'dev', tostring(dev), 'n', n + 1)
  if qs ~= '' then
    -- the share of a job's time before its progress starts, averaged the same way
    local q, m = tonumber(qs), tonumber(s[5]) or 0
    local queue = tonumber(s[4]) or q
    if m > 0 then queue = queue + math.max(0.05, 1 / (m + 1)) * (q - queue) end
    redis.call('HSET', KEYS[9], 'queue', tostring(queue), 'queued', m + 1)
  end
  if n == 0 then redis.call('EXPIRE', KEYS[9], 86400) end
end

local done, total = 0, -1
if ARGV[5] == '1' then
  redis.call('RPUSH', KEYS[5], ARGV[7] .. '\t' .. ARGV[6])
  redis.call('DEL', KEYS[1])
  done = redis.call('HINCRBY', KEYS[4], 'done', 1)
  redis.call('HINCRBY', KEYS[4], ARGV[3], 1)
  total = line_count
else
  hset[#hset + 1] = 'status'; hset[#hset + 1] = ARGV[3]
  hset[#hset + 1] = 'settled'; hset[#hset + 1] = ARGV[1]
  hset[#hset + 1] = 'owner'; hset[#hset + 1] = ''
  redis.call('HSET', KEYS[1], unpack(hset))
end
if wake then redis.call('LPUSH', KEYS[6], 'line') end
if early then redis.call('LPUSH', KEYS[6], 'due') end
if ARGV[10] ~= '' then redis.call('LPUSH', KEYS[6], ARGV[10]) end
return {1, done, total}
