-- wrk script: replay pre-signed Stripe deliveries, record what was acknowledged.
--
-- bench/run.py writes the raw HTTP requests (already signed) into BENCH_REQUESTS and their
-- lengths, one per line, into BENCH_INDEX. Each wrk thread takes every n-th request, so
-- threads never send the same delivery twice. With BENCH_STOP_AT_END=1 a thread stops once
-- it has sent its share (no request is ever repeated); otherwise it starts over.
--
-- For every 2xx answer naming an event ("id":"evt_..."), the thread writes the id to
-- BENCH_ACKS.<thread>, followed by " d" when the answer said it was a duplicate: bench/run.py
-- then checks each acknowledged event against the database. done() writes the figures as
-- JSON to BENCH_SUMMARY.

local threads = {}

function setup(thread)
   thread:set("tid", #threads)
   table.insert(threads, thread)
end

local requests = {}
local count = 0
local sent = 0
local position = 0
local answered = 0
local stop_at_end = os.getenv("BENCH_STOP_AT_END") == "1"
local acks = nil
wrapped = 0
exhausted = 0

function init(args)
   local nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")
   local data = assert(io.open(os.getenv("BENCH_REQUESTS"), "rb"))
   local index = 0
   for line in io.lines(os.getenv("BENCH_INDEX")) do
      local raw = data:read(tonumber(line))
      if index % nthreads == tid then
         count = count + 1
         requests[count] = raw
      end
      index = index + 1
   end
   data:close()
   acks = assert(io.open(os.getenv("BENCH_ACKS") .. "." .. tid, "w"))
end

function request()
   position = position + 1
   if position > count then
      position = 1
      wrapped = wrapped + 1
   end
   sent = sent + 1
   return requests[position]
end

function response(status, headers, body)
   answered = answered + 1
   if status >= 200 and status < 300 then
      local id = string.match(body, '"id":"([^"]+)"')
      if id then
         if string.find(body, '"duplicate":true', 1, true) then
            acks:write(id, " d\n")
         else
            acks:write(id, "\n")
         end
      end
   end
   if stop_at_end and answered >= count then
      exhausted = 1
      acks:flush()
      wrk.thread:stop()
   end
end

function done(summary, latency, requests)
   local wraps, stopped = 0, 0
   for _, thread in ipairs(threads) do
      wraps = wraps + (thread:get("wrapped") or 0)
      stopped = stopped + (thread:get("exhausted") or 0)
   end
   local errors = summary.errors
   local out = assert(io.open(os.getenv("BENCH_SUMMARY"), "w"))
   out:write(string.format(
      '{"duration_us": %d, "requests": %d, "bytes": %d, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"mean": %.1f, "stdev": %.1f, "min": %d, "max": %d, ' ..
      '"p50": %d, "p90": %d, "p99": %d, "p999": %d}, "wrapped": %d, "threads_exhausted": %d}\n',
      summary.duration, summary.requests, summary.bytes,
      errors.connect, errors.read, errors.write, errors.status, errors.timeout,
      latency.mean, latency.stdev, latency.min, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
      wraps, stopped))
   out:close()
end
