--[[
migrun.playbook.html: state_dir/report.html, the migration for a person who
would rather look than read: one self-contained file (inline CSS and SVG, no
script, nothing fetched), written beside report.md at the end of every run.
It covers the whole migration the journal knows, not only the playbook that
just ran:

  - a summary: the last run, the full load, the tasks, the QA, the cutover;
  - the steps of every playbook on one timeline;
  - the full load as a Gantt chart: one lane per stream, one bar per table
    (the journal records each table's start, end and stream as it commits);
  - the slots' lag and the WAL they retain over time (samples.jsonl: sampled
    by the WAL guard and while cdc.watch polls), with the thresholds;
  - every report table of every step, QA differences highlighted;
  - the cutover checklist as a list to tick;
  - the errors.

  html.render{ journal = J, playbook = P (the one that ran: its step order and
    titles), state_dir =, config = cfg (thresholds; optional), samples = (default:
    read from state_dir) } -> the page (a string)

Everything shown comes from the journal, which holds no secret; every text is
escaped. The timestamps are UTC, as in the journal.
]]
local text = require "migrun.text"
local live = require "migrun.playbook.live"

local html = {}

local function esc(s)
  if s == nil then return "" end
  return (tostring(s):gsub("[&<>\"']", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;",
    ['"'] = "&quot;", ["'"] = "&#39;" }))
end
html.escape = esc

local function fmt(n) return ("%.1f"):format(n) end

local function utc(t, pattern) return t and os.date("!" .. (pattern or "%Y-%m-%d %H:%M:%S"), math.floor(t)) or "" end

local STATUS_COLOR = { done = "#2e7d32", running = "#f9a825", failed = "#c62828", pending = "#9e9e9e" }
local PALETTE = { "#1565c0", "#6a1b9a", "#00838f", "#ef6c00", "#2e7d32", "#ad1457", "#4e342e", "#283593",
                  "#558b2f", "#00695c" }

local CSS = [[
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  margin: 0; color: #1f2328; background: #f6f8fa; }
header { background: #1f2d3d; color: #fff; padding: 20px 32px; }
header h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; }
header p { margin: 0; color: #c9d1d9; }
main { max-width: 1200px; margin: 0 auto; padding: 16px 32px 48px; }
section { background: #fff; border: 1px solid #d0d7de; border-radius: 8px; padding: 16px 20px; margin: 16px 0; }
h2 { font-size: 18px; margin: 0 0 12px; }
h3 { font-size: 15px; margin: 18px 0 8px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { flex: 1 1 180px; border: 1px solid #d0d7de; border-radius: 8px; padding: 10px 14px; background: #fff; }
.card .k { color: #57606a; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 20px; font-weight: 600; margin-top: 2px; }
.card .s { color: #57606a; font-size: 12px; }
.ok { color: #2e7d32; } .bad { color: #c62828; } .warn { color: #b26a00; }
table { border-collapse: collapse; width: 100%; font-size: 13px; margin: 4px 0 8px; }
th, td { border-bottom: 1px solid #eaeef2; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.diff td { background: #ffebe9; color: #82071e; font-weight: 600; }
.badge { display: inline-block; padding: 0 8px; border-radius: 10px; color: #fff; font-size: 12px; }
.error { border-left: 4px solid #c62828; background: #ffebe9; padding: 8px 12px; margin: 8px 0;
  white-space: pre-wrap; word-break: break-word; }
.note { color: #57606a; font-size: 12px; }
ol.checklist { list-style: none; padding-left: 0; counter-reset: item; }
ol.checklist li { counter-increment: item; padding: 6px 0 6px 36px; position: relative; border-bottom: 1px solid #eaeef2; }
ol.checklist li::before { content: "\2610  " counter(item) "."; position: absolute; left: 0; color: #57606a; }
svg { display: block; max-width: 100%; height: auto; }
.charts { display: flex; flex-wrap: wrap; gap: 8px 24px; }
.charts > div { flex: 1 1 500px; min-width: 0; }
svg text { font: 11px system-ui, sans-serif; fill: #1f2328; }
svg .axis text { fill: #57606a; }
details summary { cursor: pointer; color: #0969da; margin: 6px 0; }
.legend span { display: inline-block; margin-right: 14px; font-size: 12px; }
.legend i { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px; vertical-align: -1px; }
@media print { body { background: #fff; } section { break-inside: avoid; } }
]]

---------------------------------------------------------------------------
-- Axes
---------------------------------------------------------------------------

-- "Nice" tick steps for a span of seconds.
local TIME_STEPS = { 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
                     172800, 604800 }
local function time_step(span, ticks)
  for _, s in ipairs(TIME_STEPS) do if span / s <= ticks then return s end end
  return TIME_STEPS[#TIME_STEPS]
end

local function value_step(max, ticks)
  if max <= 0 then return 1 end
  local raw = max / ticks
  local mag = 10 ^ math.floor(math.log(raw, 10))
  for _, m in ipairs{ 1, 2, 2.5, 5, 10 } do
    if m * mag >= raw then return m * mag end
  end
  return 10 * mag
end

local function byte_step(max, ticks)
  -- powers of two times 1, 2, 5 in the unit text.bytes would use
  if max <= 0 then return 1 end
  local unit = 1
  while max / unit >= 1024 do unit = unit * 1024 end
  return value_step(max / unit, ticks) * unit
end

local function clock_label(t, span)
  if span >= 2 * 86400 then return utc(t, "%m-%d %H:%M") end
  if span >= 120 then return utc(t, "%H:%M") end
  return utc(t, "%H:%M:%S")
end

local function elapsed_label(s)
  if s > 0 and s < 10 and s ~= math.floor(s) then return ("+%.1fs"):format(s) end
  s = math.floor(s + 0.5)
  if s >= 3600 then return ("+%dh%02d"):format(s // 3600, s % 3600 // 60) end
  if s >= 60 then return ("+%dm%02d"):format(s // 60, s % 60) end
  return ("+%ds"):format(s)
end

---------------------------------------------------------------------------
-- The journal, read for the page
---------------------------------------------------------------------------

-- Playbook sections in the order people ran them; each with its steps in order.
local function sections(J, P)
  local data = J.data or J
  local list = {}
  for name, p in pairs(data.playbooks or {}) do
    local steps = {}
    local declared = P and P.name == name and P.steps
    if declared then
      for _, d in ipairs(declared) do
        local rec = (p.steps or {})[d.name] or {}
        steps[#steps + 1] = { name = d.name, title = d.title, rec = rec }
      end
    else
      -- the order the runs ran them in (the journal keeps each run's list), then by start
      local rank, n = {}, 0
      for _, r in ipairs(data.runs or {}) do
        if r.playbook == name then
          for _, sname in ipairs(r.ran or {}) do
            if not rank[sname] then n = n + 1 rank[sname] = n end
          end
        end
      end
      for sname, rec in pairs(p.steps or {}) do steps[#steps + 1] = { name = sname, title = sname, rec = rec } end
      table.sort(steps, function(a, b)
        local x, y = rank[a.name] or math.huge, rank[b.name] or math.huge
        if x ~= y then return x < y end
        x, y = a.rec.started_at or "~", b.rec.started_at or "~"
        if x ~= y then return x < y end
        return a.name < b.name
      end)
    end
    local first
    for _, s in ipairs(steps) do
      if s.rec.started_at and (not first or s.rec.started_at < first) then first = s.rec.started_at end
    end
    list[#list + 1] = { name = name, steps = steps, first = first or "~",
                        main = data.main and data.main.playbook == name }
  end
  table.sort(list, function(a, b)
    if a.main ~= b.main then return a.main end
    if a.first ~= b.first then return a.first < b.first end
    return a.name < b.name
  end)
  return list
end

local function step_times(rec, now)
  local t0 = live.epoch(rec.started_at)
  if not t0 then return nil end
  local t1 = live.epoch(rec.ended_at)
  if not t1 then t1 = rec.status == "running" and now or t0 + (rec.duration or 0) end
  return t0, math.max(t1, t0)
end

---------------------------------------------------------------------------
-- Charts
---------------------------------------------------------------------------

local function svg_open(w, h, label)
  return ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %d %d" width="%d" height="%d" role="img" aria-label="%s">')
    :format(w, h, w, h, esc(label))
end

-- The steps of every section on one time axis.
local function timeline(secs, now)
  local rows, t_min, t_max = {}, nil, nil
  for _, sec in ipairs(secs) do
    for _, s in ipairs(sec.steps) do
      local t0, t1 = step_times(s.rec, now)
      rows[#rows + 1] = { section = sec.name, step = s, t0 = t0, t1 = t1 }
      if t0 then
        t_min = math.min(t_min or t0, t0)
        t_max = math.max(t_max or t1, t1)
      end
    end
  end
  if not t_min then return '<p class="note">No step has run yet.</p>' end
  if t_max - t_min < 10 then t_max = t_min + 10 end
  local W, left, right, row_h, top = 1100, 260, 20, 20, 28
  local H = top + #rows * row_h + 10
  local plot = W - left - right
  local function x(t) return left + (t - t_min) / (t_max - t_min) * plot end
  local out = { svg_open(W, H, "timeline of the steps") }
  local span = t_max - t_min
  local step = time_step(span, 8)
  out[#out + 1] = '<g class="axis">'
  for t = math.ceil(t_min / step) * step, t_max, step do
    out[#out + 1] = ('<line x1="%s" y1="%d" x2="%s" y2="%d" stroke="#eaeef2"/><text x="%s" y="16" text-anchor="middle">%s</text>')
      :format(fmt(x(t)), top - 6, fmt(x(t)), H - 6, fmt(x(t)), esc(clock_label(t, span)))
  end
  out[#out + 1] = "</g>"
  local prev_section
  for i, r in ipairs(rows) do
    local y = top + (i - 1) * row_h
    if r.section ~= prev_section and i > 1 then
      out[#out + 1] = ('<line x1="0" y1="%d" x2="%d" y2="%d" stroke="#d0d7de"/>'):format(y, W, y)
    end
    local label = (r.section ~= prev_section and (r.section .. " · ") or "") .. r.step.name
    prev_section = r.section
    out[#out + 1] = ('<text x="%d" y="%d" text-anchor="end">%s</text>'):format(left - 8, y + 14, esc(label))
    local status = r.step.rec.status or "pending"
    if r.t0 then
      local x0, x1 = x(r.t0), x(r.t1)
      local tip = ("%s · %s: %s, %s → %s (%s)%s"):format(r.section, r.step.name, status, utc(r.t0),
        r.step.rec.ended_at and utc(r.t1) or "now", text.duration(r.t1 - r.t0),
        r.step.rec.error and ("\n" .. r.step.rec.error) or "")
      out[#out + 1] = ('<rect class="step %s" x="%s" y="%d" width="%s" height="%d" rx="2" fill="%s"><title>%s</title></rect>')
        :format(esc(status), fmt(x0), y + 4, fmt(math.max(2, x1 - x0)), row_h - 8, STATUS_COLOR[status] or "#9e9e9e",
          esc(tip))
    else
      out[#out + 1] = ('<text x="%d" y="%d" class="note" fill="#9e9e9e">not run</text>'):format(left + 4, y + 14)
    end
  end
  out[#out + 1] = "</svg>"
  out[#out + 1] = '<p class="legend">'
  for _, st in ipairs{ "done", "running", "failed" } do
    out[#out + 1] = ('<span><i style="background:%s"></i>%s</span>'):format(STATUS_COLOR[st], st)
  end
  out[#out + 1] = ("</p><p class=\"note\">UTC, %s to %s.</p>"):format(utc(t_min), utc(t_max))
  return table.concat(out, "\n")
end

-- The full load: a lane per stream, a bar per table.
local function gantt(loaded)
  local bars, t_min, t_max, streams = {}, nil, nil, {}
  for name, r in pairs(loaded) do
    local t0, t1 = tonumber(r.started), tonumber(r.ended)
    if t0 and t1 then
      local stream = tonumber(r.stream) or 1
      bars[#bars + 1] = { table = r.table or name, t0 = t0, t1 = t1, stream = stream, rows = r.rows, bytes = r.bytes,
                          seconds = r.seconds }
      t_min, t_max = math.min(t_min or t0, t0), math.max(t_max or t1, t1)
      streams[stream] = true
    end
  end
  if #bars == 0 then return nil end
  table.sort(bars, function(a, b) if a.t0 ~= b.t0 then return a.t0 < b.t0 end return a.table < b.table end)
  local lanes = {}
  for s in pairs(streams) do lanes[#lanes + 1] = s end
  table.sort(lanes)
  local lane_of = {}
  for i, s in ipairs(lanes) do lane_of[s] = i end
  if t_max - t_min < 1 then t_max = t_min + 1 end
  local W, left, right, lane_h, top = 1100, 90, 20, 34, 26
  local H = top + #lanes * lane_h + 10
  local plot = W - left - right
  local function x(t) return left + (t - t_min) / (t_max - t_min) * plot end
  local out = { svg_open(W, H, "full load: tables per stream over time") }
  local span = t_max - t_min
  local step = time_step(span, 10)
  out[#out + 1] = '<g class="axis">'
  for t = 0, span, step do
    out[#out + 1] = ('<line x1="%s" y1="%d" x2="%s" y2="%d" stroke="#eaeef2"/><text x="%s" y="14" text-anchor="middle">%s</text>')
      :format(fmt(x(t_min + t)), top - 4, fmt(x(t_min + t)), H - 6, fmt(x(t_min + t)), elapsed_label(t))
  end
  out[#out + 1] = "</g>"
  for i, s in ipairs(lanes) do
    out[#out + 1] = ('<text x="%d" y="%d" text-anchor="end">stream %d</text>'):format(left - 8,
      top + (i - 1) * lane_h + lane_h / 2 + 4, s)
  end
  for i, b in ipairs(bars) do
    local y = top + (lane_of[b.stream] - 1) * lane_h + 4
    local x0, x1 = x(b.t0), x(b.t1)
    local w = math.max(1.5, x1 - x0)
    local color = PALETTE[(i - 1) % #PALETTE + 1]
    local tip = ("%s (stream %d): %s rows, %s in %s, %s → %s UTC"):format(b.table, b.stream,
      text.thousands(tonumber(b.rows) or 0), text.bytes(tonumber(b.bytes) or 0),
      text.duration(tonumber(b.seconds) or (b.t1 - b.t0)), utc(b.t0, "%H:%M:%S"), utc(b.t1, "%H:%M:%S"))
    out[#out + 1] = ('<rect class="table" data-table="%s" x="%s" y="%d" width="%s" height="%d" rx="2" fill="%s" '
      .. 'stroke="#fff" stroke-width="0.5"><title>%s</title></rect>'):format(esc(b.table), fmt(x0), y, fmt(w),
      lane_h - 8, color, esc(tip))
    local label = b.table:gsub("^public%.", "")
    if w > #label * 6.5 + 6 then
      out[#out + 1] = ('<text x="%s" y="%d" fill="#fff" style="fill:#fff">%s</text>'):format(fmt(x0 + 4),
        y + lane_h / 2 + 0, esc(label))
    end
  end
  out[#out + 1] = "</svg>"
  return table.concat(out, "\n"), #bars, span, #lanes
end

--[[ A line chart over time. series: { { name =, points = { {t, v} } } }; opts: title,
     bytes (the axis in text.bytes), seconds, lines = { { value =, label =, color = } }
     (thresholds, dashed). ]]
local function line_chart(series, opts)
  local t_min, t_max, v_max = nil, nil, 0
  for _, s in ipairs(series) do
    for _, p in ipairs(s.points) do
      t_min, t_max = math.min(t_min or p[1], p[1]), math.max(t_max or p[1], p[1])
      v_max = math.max(v_max, p[2])
    end
  end
  if not t_min then return nil end
  for _, l in ipairs(opts.lines or {}) do
    -- a threshold far above the data would flatten it: shown only when near
    if l.value <= v_max * 4 then v_max = math.max(v_max, l.value) else l.hidden = true end
  end
  if t_max - t_min < 1 then t_max = t_min + 1 end
  local step_v = opts.bytes and byte_step(v_max * 1.05, 5) or value_step(v_max * 1.05, 5)
  local top_v = math.max(step_v, math.ceil(v_max * 1.05 / step_v) * step_v)
  local W, H, left, right, top, bottom = 540, 240, 70, 14, 14, 26
  local pw, ph = W - left - right, H - top - bottom
  local function x(t) return left + (t - t_min) / (t_max - t_min) * pw end
  local function y(v) return top + ph - v / top_v * ph end
  local function label_v(v)
    if opts.bytes then return text.bytes(v) end
    if opts.seconds then return text.duration(v) end
    return text.thousands(v)
  end
  local out = { svg_open(W, H, opts.title) }
  out[#out + 1] = '<g class="axis">'
  for v = 0, top_v + step_v / 2, step_v do
    out[#out + 1] = ('<line x1="%d" y1="%s" x2="%d" y2="%s" stroke="#eaeef2"/><text x="%d" y="%s" text-anchor="end">%s</text>')
      :format(left, fmt(y(v)), W - right, fmt(y(v)), left - 6, fmt(y(v) + 4), esc(label_v(v)))
  end
  local span = t_max - t_min
  local ts = time_step(span, 5)
  for t = math.ceil(t_min / ts) * ts, t_max, ts do
    out[#out + 1] = ('<text x="%s" y="%d" text-anchor="middle">%s</text>'):format(fmt(x(t)), H - 8,
      esc(clock_label(t, span)))
  end
  out[#out + 1] = ('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#8c959f"/>'):format(left, top + ph, W - right, top + ph)
  out[#out + 1] = "</g>"
  for _, l in ipairs(opts.lines or {}) do
    if not l.hidden then
      out[#out + 1] = ('<line x1="%d" y1="%s" x2="%d" y2="%s" stroke="%s" stroke-dasharray="5 4"/><text x="%d" y="%s" '
        .. 'text-anchor="end" fill="%s" style="fill:%s">%s</text>'):format(left, fmt(y(l.value)), W - right,
        fmt(y(l.value)), l.color, W - right - 2, fmt(y(l.value) - 3), l.color, l.color, esc(l.label))
    end
  end
  for i, s in ipairs(series) do
    local color = PALETTE[(i - 1) % #PALETTE + 1]
    local pts = {}
    for _, p in ipairs(s.points) do pts[#pts + 1] = fmt(x(p[1])) .. "," .. fmt(y(p[2])) end
    if #pts == 1 then
      out[#out + 1] = ('<circle cx="%s" cy="%s" r="3" fill="%s"/>'):format(fmt(x(s.points[1][1])),
        fmt(y(s.points[1][2])), color)
    end
    out[#out + 1] = ('<polyline class="series" data-series="%s" fill="none" stroke="%s" stroke-width="1.8" points="%s">'
      .. '<title>%s</title></polyline>'):format(esc(s.name), color, table.concat(pts, " "), esc(s.name))
  end
  out[#out + 1] = "</svg>"
  local legend = { '<p class="legend">' }
  for i, s in ipairs(series) do
    legend[#legend + 1] = ('<span><i style="background:%s"></i>%s</span>'):format(PALETTE[(i - 1) % #PALETTE + 1],
      esc(s.name))
  end
  legend[#legend + 1] = "</p>"
  return table.concat(out, "\n") .. table.concat(legend)
end

---------------------------------------------------------------------------
-- Tables
---------------------------------------------------------------------------

local function cell_text(v)
  if type(v) == "table" then return "" end
  return tostring(v == nil and "" or v)
end

local function numeric(s)
  return s:match("^%-?[%d,]+%.?%d*%s*[KMGTP]?i?B?$") ~= nil or s:match("^%-?%d+%.?%d* [smh]") ~= nil
end

-- A report table (ctx:report_table): columns of titles or { key, title }, rows
-- positional or keyed. A row whose "equal" column (the QA's) says NO is a difference.
local function report_table(t)
  local cols = {}
  for i, c in ipairs(t.columns or {}) do
    if type(c) == "table" then cols[i] = { key = c[1] or c.key, title = c[2] or c.title or c[1] or c.key }
    else cols[i] = { key = i, title = c } end
  end
  local out = { "<table><thead><tr>" }
  for _, c in ipairs(cols) do out[#out + 1] = "<th>" .. esc(c.title) .. "</th>" end
  out[#out + 1] = "</tr></thead><tbody>"
  local diffs = 0
  for _, row in ipairs(t.rows or {}) do
    local cells, diff = {}, false
    for i, c in ipairs(cols) do
      local v = row[i]
      if v == nil and type(c.key) == "string" then v = row[c.key] end
      local s = cell_text(v)
      if tostring(c.title):lower() == "equal" and (v == false or s:lower() == "no") then diff = true end
      cells[#cells + 1] = ("<td%s>%s</td>"):format(numeric(s) and ' class="num"' or "", esc(s))
    end
    if diff then diffs = diffs + 1 end
    out[#out + 1] = ("<tr%s>%s</tr>"):format(diff and ' class="diff"' or "", table.concat(cells))
  end
  out[#out + 1] = "</tbody></table>"
  return table.concat(out), diffs
end

local function checklist(t)
  local out = { '<ol class="checklist">' }
  for _, row in ipairs(t.rows or {}) do
    local what = row[2] or row["do"] or row[1]
    out[#out + 1] = "<li>" .. esc(cell_text(what)) .. "</li>"
  end
  out[#out + 1] = "</ol>"
  return table.concat(out)
end

---------------------------------------------------------------------------
-- The page
---------------------------------------------------------------------------

local function card(k, v, s, class)
  return ('<div class="card"><div class="k">%s</div><div class="v %s">%s</div><div class="s">%s</div></div>')
    :format(esc(k), class or "", esc(v), esc(s or ""))
end

local function badge(status)
  return ('<span class="badge" style="background:%s">%s</span>'):format(STATUS_COLOR[status] or "#9e9e9e", esc(status))
end

-- Every step of every section, in order: fn(section, step).
local function each_step(page, fn)
  for _, sec in ipairs(page.secs) do
    for _, s in ipairs(sec.steps) do fn(sec, s) end
  end
end

-- What the sections of the page read: the journal's sections and last run,
-- the samples, the full load (the main playbook's, else any section's: a
-- partial restart's).
local function page_of(opts)
  local J = opts.journal
  local data = J.data or J
  local runs = data.runs or {}
  local page = { opts = opts, data = data, now = opts.now or os.time(), secs = sections(J, opts.playbook),
    samples = opts.samples or (opts.state_dir and live.read_samples(opts.state_dir) or {}),
    cfg = opts.config or {}, run = runs[#runs], main_steps = {} }
  for _, sec in ipairs(page.secs) do
    if sec.main then for _, s in ipairs(sec.steps) do page.main_steps[s.name] = s.rec end end
  end
  each_step(page, function(sec, s)
    if not page.fl and type(s.rec.facts) == "table" and type(s.rec.facts.loaded) == "table"
        and next(s.rec.facts.loaded) then
      page.fl = { section = sec.name, step = s }
    end
  end)
  return page
end

local function run_card(page)
  local run = page.run
  if not run then return nil end
  local cls = run.outcome == "ok" and "ok" or (run.outcome == "running" and "warn" or "bad")
  return card("last run", ("%s: %s"):format(run.playbook or "?", run.outcome or "?"),
    ("%s → %s UTC"):format(utc(live.epoch(run.started_at), "%m-%d %H:%M"),
      run.ended_at and utc(live.epoch(run.ended_at), "%m-%d %H:%M") or "now"), cls)
end

local function full_load_card(page)
  local fl = page.fl
  if not fl then return nil end
  local n, bytes, rows = 0, 0, 0
  for _, r in pairs(fl.step.rec.facts.loaded) do
    n, bytes, rows = n + 1, bytes + (tonumber(r.bytes) or 0), rows + (tonumber(r.rows) or 0)
  end
  local know = page.main_steps.know_data
  local planned = know and know.facts and know.facts.tables
  return card("full load", ("%d%s tables"):format(n, planned and ("/" .. #planned) or ""),
    ("%s, %s rows in %s"):format(text.bytes(bytes), text.thousands(rows), text.duration(fl.step.rec.duration)),
    fl.step.rec.status == "done" and "ok" or "warn")
end

local function tasks_card(page)
  local samples, last_tasks = page.samples, nil
  for i = #samples, 1, -1 do
    if type(samples[i].tasks) == "table" then last_tasks = samples[i] break end
  end
  if not last_tasks then return nil end
  -- tasks the cutover stopped after the last look: that is what they are now
  local stopped_at
  each_step(page, function(_, st)
    if st.name == "stop_tasks" and st.rec.status == "done" then stopped_at = live.epoch(st.rec.ended_at) end
  end)
  if stopped_at and stopped_at >= last_tasks.t then
    return card("DMS tasks", ("%d stopped"):format(#last_tasks.tasks),
      ("by the cutover, %s UTC"):format(utc(stopped_at, "%m-%d %H:%M")), "ok")
  end
  local running, exc = 0, 0
  for _, t in ipairs(last_tasks.tasks) do
    if tostring(t.status):lower() == "running" then running = running + 1 end
    exc = exc + (tonumber(t.exceptions) or 0)
  end
  return card("DMS tasks", ("%d/%d running"):format(running, #last_tasks.tasks),
    ("%d apply exception(s), largest lag %s, %s UTC"):format(exc, text.bytes(tonumber(last_tasks.max_lag) or 0),
      utc(last_tasks.t, "%m-%d %H:%M")), (running == #last_tasks.tasks and exc == 0) and "ok" or "bad")
end

local function qa_card(page)
  local qa_checks, qa_diffs = 0, 0
  each_step(page, function(_, s)
    for _, t in ipairs(s.rec.tables or {}) do
      if tostring(t.title):find("QA", 1, true) or tostring(t.title):lower():find("verification", 1, true) then
        local _, d = report_table(t)
        qa_checks, qa_diffs = qa_checks + #(t.rows or {}), qa_diffs + d
      end
    end
  end)
  if qa_checks == 0 then return nil end
  return card("QA", qa_diffs == 0 and "equal" or ("%d difference(s)"):format(qa_diffs),
    ("%d checks over the runs"):format(qa_checks), qa_diffs == 0 and "ok" or "bad")
end

local function cutover_card(page)
  local cut
  for _, sec in ipairs(page.secs) do if sec.name == "cutover" then cut = sec end end
  if not cut then return nil end
  local done, n = 0, 0
  for _, s in ipairs(cut.steps) do
    n = n + 1
    if s.rec.status == "done" then done = done + 1 end
  end
  local ended = live.epoch(cut.steps[#cut.steps].rec.ended_at)
  return card("cutover", done == n and "done" or ("%d/%d steps"):format(done, n),
    ended and (utc(ended, "%Y-%m-%d %H:%M") .. " UTC") or "", done == n and "ok" or "warn")
end

local function summary_section(page)
  local cards = {}
  for _, make in ipairs{ run_card, full_load_card, tasks_card, qa_card, cutover_card } do
    cards[#cards + 1] = make(page)
  end
  return '<section id="summary"><h2>Summary</h2><div class="cards">' .. table.concat(cards) .. "</div></section>"
end

-- errors first: what needs a person
local function errors_section(page)
  local errs = {}
  each_step(page, function(sec, s)
    if s.rec.status == "failed" and s.rec.error then
      errs[#errs + 1] = ('<div class="error"><b>%s · %s</b> (%s UTC): %s</div>'):format(esc(sec.name),
        esc(s.name), esc(s.rec.ended_at or ""), esc(s.rec.error))
    end
  end)
  local run = page.run
  if run and run.error and run.outcome ~= "ok" and #errs == 0 then
    errs[#errs + 1] = ('<div class="error"><b>%s</b>: %s</div>'):format(esc(run.playbook), esc(run.error))
  end
  if #errs == 0 then return nil end
  return '<section id="errors"><h2>Errors</h2>' .. table.concat(errs) .. "</section>"
end

local function steps_section(page)
  local rows = { '<section id="timeline"><h2>Steps</h2>' .. timeline(page.secs, page.now)
    .. "\n<details><summary>"
    .. "every step as a table</summary><table><thead><tr><th>playbook</th><th>step</th>"
    .. "<th>status</th><th>started (UTC)</th><th>ended</th><th>duration</th><th>what</th></tr></thead><tbody>" }
  each_step(page, function(sec, s)
    rows[#rows + 1] = ("<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td class=\"num\">%s</td><td>%s</td></tr>")
      :format(esc(sec.name), esc(s.name), badge(s.rec.status or "pending"), esc(s.rec.started_at), esc(s.rec.ended_at),
        s.rec.duration and esc(text.duration(s.rec.duration)) or "", esc(s.title ~= s.name and s.title or ""))
  end)
  rows[#rows + 1] = "</tbody></table></details></section>"
  return table.concat(rows)
end

local function full_load_section(page)
  local fl = page.fl
  if not fl then return nil end
  local chart, n, span, lanes = gantt(fl.step.rec.facts.loaded)
  if not chart then return nil end
  return ('<section id="full-load"><h2>Full load</h2><p class="note">%s · %s: %d tables on %d stream(s) over %s; '
    .. 'each bar is a table, from its TRUNCATE to its COMMIT (hover for rows and bytes).</p>%s</section>')
    :format(esc(fl.section), esc(fl.step.name), n, lanes, esc(text.duration(span)), chart)
end

-- The samples as chart series: the WAL held back, each slot's lag in bytes
-- and in time (the slots in name order), and the last max_slot_wal_keep_size.
-- What the WAL guard's thresholds are about: the WAL held back from the
-- oldest restart_lsn (the slots share one WAL stream: their figures do not add up).
local function slot_series(samples)
  local retained = { name = "held back by migrun's slots", points = {} }
  local lag, lag_time, keep_bytes = { by = {}, order = {} }, { by = {}, order = {} }, nil
  local function point(series, slot, t, v)
    if not series.by[slot] then
      series.by[slot] = { name = slot, points = {} }
      series.order[#series.order + 1] = slot
    end
    local pts = series.by[slot].points
    pts[#pts + 1] = { t, v }
  end
  for _, s in ipairs(samples) do
    local held = tonumber(s.held_bytes) or live.held(s.slots) or tonumber(s.retained_bytes)
    if held then retained.points[#retained.points + 1] = { s.t, held } end
    keep_bytes = tonumber(s.keep_bytes) or keep_bytes
    for _, sl in ipairs(type(s.slots) == "table" and s.slots or {}) do
      if tonumber(sl.lag_bytes) then point(lag, sl.slot, s.t, sl.lag_bytes) end
      if tonumber(sl.lag_seconds) then point(lag_time, sl.slot, s.t, sl.lag_seconds) end
    end
  end
  local function list(series)
    table.sort(series.order)
    local out = {}
    for _, name in ipairs(series.order) do out[#out + 1] = series.by[name] end
    return out
  end
  return retained, list(lag), list(lag_time), keep_bytes
end

-- lag and retained WAL over time
local function slots_section(page)
  local samples = page.samples
  local retained, lag_series, secs_series, keep_bytes = slot_series(samples)
  if #retained.points == 0 then return nil end
  local guard = page.cfg.wal_guard or {}
  local catch = (page.cfg.dms or {}).catch_up or {}
  local parts = { '<section id="cdc"><h2>Slots: lag and retained WAL</h2><p class="note">Sampled by the WAL guard and '
    .. ("while the tasks were watched (%d readings, UTC).</p>"):format(#samples) }
  parts[#parts + 1] = '<div class="charts">'
  local lag_chart = line_chart(lag_series, { title = "lag per slot (bytes)", bytes = true,
    lines = catch.lag_bytes and { { value = catch.lag_bytes, label = "caught up below", color = "#2e7d32" } } })
  if lag_chart then parts[#parts + 1] = '<div id="chart-lag"><h3>Lag per slot</h3>' .. lag_chart .. "</div>" end
  local sec_chart = #secs_series > 0 and line_chart(secs_series, { title = "lag per slot (time)", seconds = true })
  if sec_chart then parts[#parts + 1] = '<div id="chart-lag-time"><h3>Lag per slot, in time</h3>' .. sec_chart .. "</div>" end
  local lines = {}
  if guard.warn_bytes then lines[#lines + 1] = { value = guard.warn_bytes, label = "WAL guard: warn", color = "#b26a00" } end
  if guard.stop_bytes then lines[#lines + 1] = { value = guard.stop_bytes, label = "WAL guard: stop", color = "#c62828" } end
  if keep_bytes then
    lines[#lines + 1] = { value = keep_bytes, label = "max_slot_wal_keep_size: slots lost", color = "#6a1b9a" }
  end
  parts[#parts + 1] = '<div id="chart-wal"><h3>WAL held back on the primary</h3>' .. (line_chart({ retained },
    { title = "WAL held back", bytes = true, lines = lines }) or "") .. "</div>"
  parts[#parts + 1] = "</div></section>"
  return table.concat(parts)
end

-- every step's report tables -> the checklist's section (the last one), the tables' section
local function report_sections(page)
  local tparts, check_html = {}, nil
  each_step(page, function(sec, s)
    for _, t in ipairs(s.rec.tables or {}) do
      if tostring(t.title):lower():find("checklist", 1, true) then
        check_html = ('<section id="checklist"><h2>%s</h2><p class="note">%s · %s, %s UTC</p>%s</section>')
          :format(esc(t.title), esc(sec.name), esc(s.name), esc(s.rec.ended_at or ""), checklist(t))
      else
        local tbl, d = report_table(t)
        tparts[#tparts + 1] = ('<h3 id="%s">%s <span class="note">%s · %s%s</span></h3>%s')
          :format(esc((sec.name .. "-" .. s.name .. "-" .. t.title):gsub("[^%w]+", "-"):lower()), esc(t.title),
            esc(sec.name), esc(s.name), d > 0 and (' · <b class="bad">' .. d .. " difference(s)</b>") or "",
            #(t.rows or {}) > 40 and ("<details><summary>%d rows</summary>%s</details>"):format(#t.rows, tbl) or tbl)
      end
    end
  end)
  return check_html,
    #tparts > 0 and ('<section id="tables"><h2>Reports of the steps</h2>' .. table.concat(tparts) .. "</section>") or nil
end

function html.render(opts)
  assert(type(opts) == "table" and opts.journal, "html.render{ journal = J, ... } expected")
  local page = page_of(opts)
  local body = {}
  for _, section in ipairs{ summary_section, errors_section, steps_section, full_load_section, slots_section } do
    body[#body + 1] = section(page)
  end
  local check_html, tables_html = report_sections(page)
  body[#body + 1] = check_html
  body[#body + 1] = tables_html

  local title = ("%s: migration report"):format(page.data.migration or "migration")
  return table.concat{
    "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
    "<title>", esc(title), "</title>\n<style>", CSS, "</style>\n</head>\n<body>\n",
    "<header><h1>", esc(title), "</h1><p>",
    esc(("generated %s UTC by migrun · state directory %s"):format(utc(page.now), opts.state_dir or "?")),
    "</p></header>\n<main>\n", table.concat(body, "\n"), "\n</main>\n</body>\n</html>\n" }
end

return html
