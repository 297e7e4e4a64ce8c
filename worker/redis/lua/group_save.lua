-- group_save.lua: a group's task saves what it did, if the group is still its own.
--
-- KEYS[1]  the group's record ib:B:g:G;  KEYS[2] its lines ib:B:gm:G
-- KEYS[3]  ib:groups:P;  KEYS[4] the batch's open groups ib:B:groups
-- ARGV[1]  the seq the task runs under (another dispatch took the group since: nothing happens)
-- ARGV[2]  the member "B G";  ARGV[3] when the group's next step is due (epoch s), 'keep' (the
--          task goes on: its lease stands), or 'done' (every line has left it: it is removed)
-- ARGV[4..] field/value pairs to set
-- Returns 1 when saved, 0 when stale.

if redis.call('HGET', KEYS[1], 'seq') ~= ARGV[1] then return 0 end
if ARGV[3] == 'done' then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
  redis.call('SREM', KEYS[4], string.match(ARGV[2], ' (%S+)$'))
  return 1
end
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
if ARGV[3] ~= 'keep' then redis.call('ZADD', KEYS[3], tonumber(ARGV[3]), ARGV[2]) end
return 1
