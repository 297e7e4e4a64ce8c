-- pump.lua: hand out what one provider can do now: due polls within the poll budget, READY
-- lines into free slots within the submit budget, the running batches taking turns.
--
-- KEYS[1]  ib:limit:P     the provider's limits: cap, submit_rate, poll_rate, each kind's token
--                         bucket (<kind>_tokens, <kind>_at) and pause (<kind>_pause), counters
-- KEYS[2]  ib:flight:P    lines holding P's slots, by when they next need a step
-- KEYS[3]  ib:queues:P    batches with READY lines for P
-- KEYS[4]  ib:pools       pool queues with READY lines ("B@a,b,c": batch B's lines that may go
--                         to a, b or c, cheapest first)
-- KEYS[5]  ib:health:P    P's breaker: cooling down until `until`; a probe out until `probe`
-- ARGV[1]  now (epoch s);  ARGV[2] lease (s) given to every line handed out
-- ARGV[3]  the line key format ("ib:%s:l:%s");  ARGV[4] the ready key format ("ib:%s:ready:%s")
-- ARGV[5]  the provider's name (for the ready keys)
-- ARGV[6]  at most this many polls;  ARGV[7] at most this many submits (a handoff asks for 1)
-- ARGV[8]  cap, ARGV[9] submit rate, ARGV[10] poll rate: used until the controller set its own
-- ARGV[11..14] key formats of a batch's providers out (ib:%s:out), and of another provider's
--          health, limits and flight (a pool line waits for a cheaper member that can take it)
-- ARGV[15] lead (s): a poll due this soon is handed out now (its task waits until it is due)
--
-- Each kind spends its own token bucket (burst: four fifths of a second's worth, at least one;
-- submits no more than the cap), so polls never spend the submit budget nor the reverse. A token is only
-- spent on a line handed out. Batches take turns (round robin from a rotating start), one line
-- each per turn, so a small batch's lines go out beside a big batch's. Every line handed out
-- gets a new seq (older messages become stale) and a lease: its score moves to now + lease,
-- so a dispatch that dies is picked up again when the lease runs out. Slots are taken here
-- and given back only by apply.lua, when a line leaves flight.
-- A pool line is taken by P only when every cheaper member of its queue cannot take it now
-- (out of the batch, cooling down, at its cap, out of submit tokens): so the cheapest member
-- with room gets it, and the pool's throughput is the sum of its members'. A provider cooling
-- down submits nothing; once the cooldown ends it sends one probe line before any other.
-- Returns {{member, seq, status}...} polls, {{member, seq}...} submits, in flight after,
-- next flight due, next ready due, {submit, poll, cap} binding (1/0: that limit held due work
-- back), seconds until the next submit token, seconds until the next poll token, and 1 when
-- P left a pool's lines to a cheaper member that could take them (0 otherwise).

local now, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local horizon = now + (tonumber(ARGV[15]) or 0)
local provider = ARGV[5]
local want_polls, want_submits = tonumber(ARGV[6]), tonumber(ARGV[7])
local s = redis.call('HMGET', KEYS[1], 'cap', 'submit_rate', 'poll_rate', 'submit_tokens',
  'submit_at', 'poll_tokens', 'poll_at', 'submit_pause', 'poll_pause', 'rr')
local cap = tonumber(s[1]) or tonumber(ARGV[8])
local rates = {submit = tonumber(s[2]) or tonumber(ARGV[9]), poll = tonumber(s[3]) or tonumber(ARGV[10])}
-- A burst of at most four fifths of a second's worth: a submit dispatched now may reach the
-- provider a little later than one dispatched after it (a busy worker, a handoff), and the
-- fifth left over absorbs that bunching at an account whose limit is exactly ours.
local bursts = {
  submit = math.max(1, math.min(math.floor(0.8 * rates.submit), cap)),
  poll = math.max(1, math.floor(0.8 * rates.poll)),
}
-- Each bucket's clock only moves forward: pumps run on several workers, each passing the
-- time it read before its call, so a pump may pass a time older than the last one stored.
-- Storing that older time would refill the same interval twice (a busy machine, where the
-- gap grows, would send above the rate).
local tokens, clocks = {}, {}
for kind, slot in pairs({submit = 4, poll = 6}) do
  local have, at = tonumber(s[slot]), tonumber(s[slot + 1])
  if have == nil then have, at = bursts[kind], now end
  tokens[kind] = math.min(bursts[kind], have + math.max(0, now - at) * rates[kind])
  clocks[kind] = tostring(math.max(now, at))
end
local paused = {submit = now < (tonumber(s[8]) or 0), poll = now < (tonumber(s[9]) or 0)}
local health = redis.call('HMGET', KEYS[5], 'until', 'probe')
local cool_until, probe_until = tonumber(health[1]) or 0, tonumber(health[2]) or 0
local probe = false
if cool_until > 0 then
  if now < cool_until or now < probe_until then paused.submit = true else probe = true end
end

local function line_key(member)
  local b, i = string.match(member, '^(.*) (%d+)$')
  return string.format(ARGV[3], b, i)
end

-- Due polls (and steps whose lease ran out): one poll token each.
local polls = {}
local budget = paused.poll and 0 or math.min(want_polls, math.floor(tokens.poll))
if budget > 0 then
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', horizon, 'LIMIT', 0, budget)) do
    local key = line_key(m)
    local seq = redis.call('HINCRBY', key, 'seq', 1)
    if seq == 1 then  -- no such line (its batch was purged): drop the orphan
      redis.call('DEL', key); redis.call('ZREM', KEYS[2], m)
    else
      redis.call('ZADD', KEYS[2], now + lease, m)
      polls[#polls + 1] = {m, seq, redis.call('HGET', key, 'status')}
    end
  end
end
tokens.poll = tokens.poll - #polls

-- Can another provider take a line of batch b now? (A pool line waits for the cheapest.)
local able_cache = {}
local function able(c, b)
  local id = c .. ' ' .. b
  if able_cache[id] ~= nil then return able_cache[id] end
  local yes = true
  local h = redis.call('HMGET', string.format(ARGV[12], c), 'until', 'probe')
  local cu = tonumber(h[1]) or 0
  local l = redis.call('HMGET', string.format(ARGV[13], c), 'cap_used', 'rate_used', 'burst_used',
    'submit_tokens', 'submit_at', 'submit_pause')
  if redis.call('HEXISTS', string.format(ARGV[11], b), c) == 1 then yes = false
  elseif cu > 0 and (now < cu or now < (tonumber(h[2]) or 0)) then yes = false
  elseif tonumber(l[1]) ~= nil then
    local have = tonumber(l[4]) or tonumber(l[3])
    local filled = math.min(tonumber(l[3]), have + math.max(0, now - (tonumber(l[5]) or now)) * tonumber(l[2]))
    if redis.call('ZCARD', string.format(ARGV[14], c)) >= tonumber(l[1]) then yes = false
    elseif now < (tonumber(l[6]) or 0) or filled < 1 then yes = false end
  end
  able_cache[id] = yes
  return yes
end

-- The queues P takes READY lines from: its batches' own, and the pools it is a member of
-- whose cheaper members cannot take their lines now.
local queues, deferred = {}, 0
for _, b in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  queues[#queues + 1] = {name = b, set = KEYS[3], key = string.format(ARGV[4], b, provider)}
end
for _, m in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  local b, q = string.match(m, '^(.-)(@.*)$')
  local mine, cheaper_able = false, false
  for c in string.gmatch(string.sub(q, 2), '[^,]+') do
    if c == provider then mine = true; break end
    if able(c, b) then cheaper_able = true; break end
  end
  if mine and not cheaper_able and redis.call('HEXISTS', string.format(ARGV[11], b), provider) == 0 then
    queues[#queues + 1] = {name = m, set = KEYS[4], key = string.format(ARGV[4], b, q)}
  elseif mine and cheaper_able then
    deferred = 1
  end
end
table.sort(queues, function(x, y) return x.name < y.name end)

-- READY lines into free slots, the batches taking turns.
local inflight = redis.call('ZCARD', KEYS[2])
local free = math.max(0, cap - inflight)
local turn = 0
if #queues > 1 then turn = redis.call('HINCRBY', KEYS[1], 'rr', 1) % #queues end
local order = {}
for j = 1, #queues do order[j] = queues[(turn + j - 1) % #queues + 1] end

local submits = {}
local room = paused.submit and 0 or math.min(free, want_submits, math.floor(tokens.submit))
if probe then room = math.min(room, 1) end
-- Each turn visits the batches still giving lines; one with none due drops out of this pump
-- (and out of the queues when it has none at all).
local open = order
while room > 0 and #open > 0 do
  local still = {}
  for _, queue in ipairs(open) do
    if room == 0 then still[#still + 1] = queue else
      local key = queue.key
      local due = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, 1)
      if #due > 0 then
        local m = due[1]
        redis.call('ZREM', key, m)
        local lkey = line_key(m)
        local seq = redis.call('HINCRBY', lkey, 'seq', 1)
        if seq == 1 then
          redis.call('DEL', lkey)
        else
          redis.call('ZADD', KEYS[2], now + lease, m)
          redis.call('HSET', lkey, 'status', 'submitting', 'provider', provider)
          submits[#submits + 1] = {m, seq}
          room = room - 1
        end
        still[#still + 1] = queue
      elseif redis.call('ZCARD', key) == 0 then
        redis.call('SREM', queue.set, queue.name)
      end
    end
  end
  open = still
end
tokens.submit = tokens.submit - #submits
inflight = inflight + #submits
if probe and #submits > 0 then redis.call('HSET', KEYS[5], 'probe', tostring(now + lease)) end

-- What is still due, and which limit holds it back; when the next thing falls due.
local ready_due, next_ready, next_ready_text = false, nil, ''
for _, queue in ipairs(order) do
  local first = redis.call('ZRANGE', queue.key, 0, 0, 'WITHSCORES')
  if first[2] then
    local at = tonumber(first[2])
    if at <= now then ready_due = true end
    if next_ready == nil or at < next_ready then next_ready, next_ready_text = at, first[2] end
  end
end
local nf = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local flight_due = nf[2] ~= nil and tonumber(nf[2]) <= horizon
local binding = {
  (ready_due and inflight < cap and tokens.submit < 1) and 1 or 0,
  (flight_due and tokens.poll < 1) and 1 or 0,
  (ready_due and inflight >= cap) and 1 or 0,
}

redis.call('HSET', KEYS[1],
  'submit_tokens', tostring(tokens.submit), 'submit_at', clocks.submit,
  'poll_tokens', tostring(tokens.poll), 'poll_at', clocks.poll,
  'cap_used', cap, 'rate_used', tostring(rates.submit), 'burst_used', bursts.submit)
if #submits > 0 then redis.call('HINCRBY', KEYS[1], 'submit_sent', #submits) end
if #polls > 0 then redis.call('HINCRBY', KEYS[1], 'poll_sent', #polls) end

local function until_token(kind, pause)
  local wait = math.max(0, (1 - tokens[kind]) / rates[kind]) + math.max(0, tonumber(clocks[kind]) - now)
  return tostring(math.max(wait, pause - now))
end
return {polls, submits, inflight, nf[2] or '', next_ready_text, binding,
  until_token('submit', tonumber(s[8]) or 0), until_token('poll', tonumber(s[9]) or 0), deferred}
