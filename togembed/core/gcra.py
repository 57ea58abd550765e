"""The Lua scripts that keep a shared rate limit inside Redis: GCRA (a token bucket stored as
its "theoretical arrival time") for requests and for tokens, a pause after a 429, a shared
slow-down factor (AIMD), and the limits learned from the server's headers. Every time is
Redis's own clock (``TIME``), so processes on machines whose clocks differ still agree.

Pure text and constants; ``RedisLimiter`` runs them. All state of one limit is one hash:
``rps``/``tps`` (requests/tokens per second, configured or learned), ``burst``, ``headroom``,
``factor``, ``req_tat``/``tok_tat``, ``paused_until``, ``probe_until``/``probed`` (an
unconfigured limit sends one request until an answer says what the limit is),
``last_cut``/``recovered_at``.
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "RELEASE", "STATE_TTL_MS"]

# State of a limit nobody used for a day is dropped.
STATE_TTL_MS = 86_400_000

_PRELUDE = """
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local function num(v, default)
  local n = tonumber(v); if n == nil then return default end; return n
end
local h = redis.call('HMGET', key, 'rps', 'tps', 'burst', 'headroom', 'factor', 'req_tat',
  'tok_tat', 'paused_until', 'probed', 'probe_until', 'last_cut', 'recovered_at', 'slack')
local rps, tps = num(h[1], nil), num(h[2], nil)
local burst, headroom, factor = num(h[3], 1.0), num(h[4], 0.99), num(h[5], 1.0)
local req_tat, tok_tat = math.max(num(h[6], now), now), math.max(num(h[7], now), now)
local slack = num(h[13], 1.0)
local function req_bucket()  -- seconds per request, capacity
  if rps == nil then return nil, nil end
  return 1.0 / (rps * headroom * factor), math.max(1.0, rps * burst - slack)
end
local function tok_bucket()
  if tps == nil then return nil, nil end
  return 1.0 / (tps * headroom * factor), tps * burst
end
"""

# ARGV: tokens, probe_ttl (s). Returns {"ok", now, probe(0|1)} or {"wait", seconds, probe}.
ACQUIRE = (
    _PRELUDE
    + """
local cost = tonumber(ARGV[1])
local paused = num(h[8], 0)
if paused > now then return {'wait', tostring(paused - now), '0'} end
if rps == nil and tps == nil then
  if h[9] then return {'ok', tostring(now), '0'} end  -- probed: the server states no limit
  local probe_until = num(h[10], 0)
  if probe_until > now then return {'wait', tostring(probe_until - now), '1'} end
  redis.call('HSET', key, 'probe_until', tostring(now + tonumber(ARGV[2])))
  redis.call('PEXPIRE', key, %(ttl)d)
  return {'ok', tostring(now), '1'}
end
local wait = 0.0
local T, cap = req_bucket()
if T then
  local over = req_tat - now - (cap - 1) * T
  if over > wait then wait = over end
end
local U, tcap = tok_bucket()
if U then
  local over = tok_tat - now - (tcap - math.min(cost, tcap)) * U
  if over > wait then wait = over end
end
if wait > 0 then return {'wait', tostring(wait), '0'} end
if T then redis.call('HSET', key, 'req_tat', tostring(req_tat + T)) end
if U then redis.call('HSET', key, 'tok_tat', tostring(tok_tat + cost * U)) end
redis.call('PEXPIRE', key, %(ttl)d)
return {'ok', tostring(now), '0'}
"""
)

# ARGV: sent(0|1), probe(0|1), tokens charged, token correction (actual - charged),
# learned rps ('' = none), learned tps, requests remaining (''), tokens remaining (''),
# over the limit (0|1), retry_after (s, '' = none), success (0|1), ticket sent_at,
# answered (0|1).
RELEASE = (
    _PRELUDE
    + """
local sent, probe = ARGV[1] == '1', ARGV[2] == '1'
local charged, correction = tonumber(ARGV[3]), tonumber(ARGV[4])
local T, cap = req_bucket()
local U, tcap = tok_bucket()
if probe then redis.call('HDEL', key, 'probe_until') end
if not sent then  -- never sent: refund what it took
  if T then redis.call('HSET', key, 'req_tat', tostring(math.max(now, req_tat - T))) end
  if U then redis.call('HSET', key, 'tok_tat', tostring(math.max(now, tok_tat - charged * U))) end
  return 'ok'
end
if ARGV[13] == '1' and probe then redis.call('HSET', key, 'probed', '1') end
if ARGV[5] ~= '' or ARGV[6] ~= '' then  -- limits learned from the headers (unconfigured)
  if ARGV[5] ~= '' then rps = tonumber(ARGV[5]); redis.call('HSET', key, 'rps', ARGV[5]) end
  if ARGV[6] ~= '' then tps = tonumber(ARGV[6]); redis.call('HSET', key, 'tps', ARGV[6]) end
  headroom = 0.95
  redis.call('HSET', key, 'headroom', '0.95', 'slack', '0', 'probed', '1')
  T, cap = req_bucket()
  U, tcap = tok_bucket()
end
if U and correction ~= 0 then tok_tat = tok_tat + correction * U end
-- The server's "remaining" is the truth about its bucket (every process shares it).
if T and ARGV[7] ~= '' then req_tat = math.max(req_tat, now + (cap - tonumber(ARGV[7])) * T) end
if U and ARGV[8] ~= '' then tok_tat = math.max(tok_tat, now + (tcap - tonumber(ARGV[8])) * U) end
if ARGV[9] == '1' then  -- a 429 that says we go too fast: pause, drain, cut the pace
  if ARGV[10] ~= '' then
    local until_ = now + tonumber(ARGV[10])
    if until_ > num(h[8], 0) then redis.call('HSET', key, 'paused_until', tostring(until_)) end
  end
  if T then req_tat = math.max(req_tat, now + cap * T) end
  if U then tok_tat = math.max(tok_tat, now + tcap * U) end
  if tonumber(ARGV[12]) > num(h[11], 0) then  -- sent after the last cut: news
    factor = math.max(0.05, factor * 0.7)
    redis.call('HSET', key, 'factor', tostring(factor), 'last_cut', tostring(now),
      'recovered_at', tostring(now))
  end
elseif ARGV[11] == '1' and factor < 1.0 then  -- recover: the gap halves every second
  local gap = (1.0 - factor) * math.pow(0.5, now - num(h[12], now))
  factor = math.min(1.0, math.max(factor + 0.02, 1.0 - gap))
  if factor > 0.999 then factor = 1.0 end
  redis.call('HSET', key, 'factor', tostring(factor), 'recovered_at', tostring(now))
end
if T then redis.call('HSET', key, 'req_tat', tostring(req_tat)) end
if U then redis.call('HSET', key, 'tok_tat', tostring(tok_tat)) end
redis.call('PEXPIRE', key, %(ttl)d)
return 'ok'
"""
)

ACQUIRE = ACQUIRE % {"ttl": STATE_TTL_MS}
RELEASE = RELEASE % {"ttl": STATE_TTL_MS}
