-- admit.lua: the feeder admits the next lines of the archived manifest into the window.
--
-- KEYS[1]  the batch record ib:B;  KEYS[2] ib:providers;  KEYS[3] the counters ib:B:n
-- KEYS[4]  the unflushed rows ib:B:rows;  KEYS[5] the wake list;  KEYS[6] ib:pools
-- ARGV[1]  the cursor index the feeder read from (another feeder moved it: nothing happens)
-- ARGV[2..4] the new cursor: index, byte offset, physical line number
-- ARGV[5]  the line key format;  ARGV[6] the ready-zset key format (batch, provider)
-- ARGV[7]  the provider-queues key format (provider);  ARGV[8] eligible time
-- ARGV[9]  n lines, then per line: index, its READY queue (its provider, or a pool's
--          "@a,b,c"), field count f, then f field/value pairs
-- then r rows (lines that end at once: a stopped or cancelled batch), per row: index,
-- status, row JSON.
-- Atomic, so a feed that runs twice or late admits nothing twice (the cursor is the check),
-- and a line is never in the window without being in its batch's ready queue.
-- Returns 1 when admitted, 0 when the cursor had moved.

if redis.call('HGET', KEYS[1], 'cursor_idx') ~= ARGV[1] then return 0 end
local b = redis.call('HGET', KEYS[1], 'batch_id')
local i = 9
local n = tonumber(ARGV[i]); i = i + 1
local seen = {}
for _ = 1, n do
  local idx, provider, f = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]); i = i + 3
  local fields = {}
  for _ = 1, f do fields[#fields + 1] = ARGV[i]; fields[#fields + 1] = ARGV[i + 1]; i = i + 2 end
  redis.call('HSET', string.format(ARGV[5], b, idx), unpack(fields))
  redis.call('ZADD', string.format(ARGV[6], b, provider), ARGV[8], b .. ' ' .. idx)
  if not seen[provider] then
    if string.sub(provider, 1, 1) == '@' then
      for member in string.gmatch(string.sub(provider, 2), '[^,]+') do
        redis.call('SADD', KEYS[2], member)
      end
      redis.call('SADD', KEYS[6], b .. provider)
    else
      redis.call('SADD', KEYS[2], provider)
      redis.call('SADD', string.format(ARGV[7], provider), b)
    end
    seen[provider] = true
  end
end
local r = tonumber(ARGV[i]); i = i + 1
for _ = 1, r do
  redis.call('RPUSH', KEYS[4], ARGV[i] .. '\t' .. ARGV[i + 2])
  redis.call('HINCRBY', KEYS[3], ARGV[i + 1], 1)
  i = i + 3
end
if r > 0 then redis.call('HINCRBY', KEYS[3], 'done', r) end
redis.call('HSET', KEYS[1], 'cursor_idx', ARGV[2], 'cursor_offset', ARGV[3], 'cursor_line', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'admitted', n + r)
if n > 0 or r > 0 then redis.call('LPUSH', KEYS[5], 'admit') end
return 1
