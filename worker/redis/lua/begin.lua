-- begin.lua: a task starts a step that must not run twice at once (a paid submit, a store).
--
-- KEYS[1]  the line's hash
-- ARGV[1]  the seq the task was dispatched with;  ARGV[2] the task's owner token "seq:uuid"
-- Refused (nil) when the seq is stale or another copy of this dispatch already began.
-- Returns the line's hash otherwise.

local s = redis.call('HMGET', KEYS[1], 'seq', 'owner')
if s[1] ~= ARGV[1] then return nil end
local owner = s[2]
if owner and owner ~= '' and string.match(owner, '^(%d+):') == ARGV[1] then return nil end
redis.call('HSET', KEYS[1], 'owner', ARGV[2])
return redis.call('HGETALL', KEYS[1])
