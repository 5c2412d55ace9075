--[[
migrun.rehearsal.awkward: a schema migrun was not designed around, and a
write workload on it, for rehearsals of the DMS boundary (docs/dms-boundary.md,
issue 10) and tests/spec/e2e_awkward_spec.lua:

  demo.rehearsal{ dir = ..., sample = "migrun.rehearsal.awkward" }

What is in it, each with rows, and what DMS would make of it:
  * a schema with a space in its name ("Sales Ops"), owned by an ordinary
    role (sales_owner) that the target must get too, next to tables in
    public owned by the source's superuser;
  * quoted mixed-case tables and columns ("Customer"."CustomerId"), a table
    named with a reserved word ("group");
  * an enum (order_status);
  * GENERATED ALWAYS AS IDENTITY keys ("Customer", "Order"): DMS writes the
    source's values, which ALWAYS refuses (428C9);
  * a stored generated column ("OrderLine".total_cents): DMS writes it, which
    PostgreSQL refuses (428C9);
  * a composite primary key ("OrderLine");
  * foreign keys, one ON DELETE CASCADE ("OrderLine" -> "Order" -> "Customer")
    in different DMS tasks, so a child can arrive before its parent;
  * a trigger on "Order" that writes into another migrated table
    ("OrderHistory"): fired again on the target it would duplicate rows;
  * a BEFORE UPDATE trigger marked ENABLE ALWAYS ("group".touched_at): it
    fires even in a replica session and would rewrite the replicated value;
  * numeric without precision ("Order".amount, 15+ decimals): DMS's default
    NUMERIC(28,6) would round it;
  * jsonb values of about 200 KB ("Document".body);
  * a partitioned table (events, three partitions);
  * a table without a primary key (public.page_hits; the workload only
    inserts into it, the only change DMS can carry there);
  * a table with FORCE ROW LEVEL SECURITY and a policy ("private_note"):
    it would hide rows from the owner DMS writes as;
  * a standalone sequence (invoice_seq) the workload draws from.

  awkward.load_sample(conn, { scale = 1 })    -- on the source primary, as a superuser
  awkward.workload(conn, opts)                -- demo.drive's options
  awkward.tables()                            -- every table (partitions, not their parent)
  awkward.config_defaults()                   -- what a rehearsal's config needs for it
]]
local demo = require "migrun.rehearsal.demo"

local awkward = {}

awkward.SCHEMA = "Sales Ops"

function awkward.tables()
  return {
    { "Sales Ops", "Customer" }, { "Sales Ops", "Order" }, { "Sales Ops", "OrderLine" },
    { "Sales Ops", "OrderHistory" }, { "Sales Ops", "Document" }, { "Sales Ops", "group" },
    { "Sales Ops", "events_old" }, { "Sales Ops", "events_recent" }, { "Sales Ops", "events_default" },
    { "Sales Ops", "private_note" }, { "public", "page_hits" },
  }
end

function awkward.config_defaults()
  return {
    schemas = { "Sales Ops", "public" },
    groups = { largest_alone = 2 },
    lobs = { tables = { ["Sales Ops.Document"] = { max_kb = 256, truncation_ok = false } } },
    qa = { timestamp_column = "created_at", large_tables = 3, small_sample = 20 },
    -- public.page_hits has no primary key: it only gets inserts, which DMS carries
  }
end

local function exec(conn, sql, ...)
  return assert(conn:exec(sql, ...))
end

-- ~200 KB of JSON: 6,400 md5 strings of 32 characters.
local BIG_JSON = "jsonb_build_object('id', %s, 'blob', repeat(md5((%s)::text), 6400), 'tags', jsonb_build_array('a', 'b'))"

-- Long, and left so: it is the sample's schema and rows written out as SQL, one
-- statement a feature, read top to bottom like the list in the header.
function awkward.load_sample(conn, opts)
  opts = opts or {}
  local scale = opts.scale or 1
  local n = function(x) return math.max(1, math.floor(x * scale)) end
  local spread = "now() - (random() * interval '170 days')"
  exec(conn, [[
    create role sales_owner nologin;
    create schema "Sales Ops" authorization sales_owner;
    grant usage on schema "Sales Ops" to public;
    set role sales_owner;
    create type "Sales Ops".order_status as enum ('new', 'paid', 'shipped', 'cancelled');
    create sequence "Sales Ops".invoice_seq start 100000;
    create table "Sales Ops"."Customer" (
      "CustomerId" int generated always as identity primary key,
      "Name" text not null, email text,
      created_at timestamptz not null default now());
    create table "Sales Ops"."Order" (
      id bigint generated always as identity primary key,
      "CustomerId" int not null references "Sales Ops"."Customer",
      status "Sales Ops".order_status not null default 'new',
      amount numeric not null,
      invoice_no bigint,
      created_at timestamptz not null default now());
    create table "Sales Ops"."OrderLine" (
      order_id bigint not null references "Sales Ops"."Order" on delete cascade,
      line_no int not null,
      qty int not null,
      unit_cents bigint not null,
      total_cents bigint generated always as (qty * unit_cents) stored,
      created_at timestamptz not null default now(),
      primary key (order_id, line_no));
    create table "Sales Ops"."OrderHistory" (
      id bigserial primary key,
      order_id bigint not null,
      status "Sales Ops".order_status not null,
      created_at timestamptz not null default now());
    create function "Sales Ops".order_history() returns trigger language plpgsql as $$
      begin
        insert into "Sales Ops"."OrderHistory" (order_id, status, created_at) values (new.id, new.status, new.created_at);
        return new;
      end $$;
    create trigger order_history after insert or update of status on "Sales Ops"."Order"
      for each row execute function "Sales Ops".order_history();
    create table "Sales Ops"."Document" (
      id bigserial primary key, title text not null, body jsonb not null,
      created_at timestamptz not null default now());
    create table "Sales Ops"."group" (
      id int primary key, name text not null, touched_at timestamptz,
      created_at timestamptz not null default now());
    create function "Sales Ops".touch() returns trigger language plpgsql as $$
      begin new.touched_at := clock_timestamp(); return new; end $$;
    create trigger touch before update on "Sales Ops"."group" for each row execute function "Sales Ops".touch();
    alter table "Sales Ops"."group" enable always trigger touch;
    create table "Sales Ops".events (
      id bigint not null, kind text not null, created_at timestamptz not null,
      primary key (id, created_at)) partition by range (created_at);
    create table "Sales Ops".private_note (
      id int primary key, author text not null, note text not null,
      created_at timestamptz not null default now());
    alter table "Sales Ops".private_note enable row level security;
    alter table "Sales Ops".private_note force row level security;
    create policy own_notes on "Sales Ops".private_note using (author = current_user);
    reset role;
    create table public.page_hits (customer_id int, url text not null, created_at timestamptz not null default now());
  ]])
  -- partitions around now, made once (a partition bound is a constant)
  exec(conn, [[
    do $$ begin
      execute format('create table "Sales Ops".events_old partition of "Sales Ops".events '
        || 'for values from (minvalue) to (%L)', now() - interval '90 days');
      execute format('create table "Sales Ops".events_recent partition of "Sales Ops".events '
        || 'for values from (%L) to (%L)', now() - interval '90 days', now() + interval '30 days');
    end $$;
    create table "Sales Ops".events_default partition of "Sales Ops".events default;
    alter table "Sales Ops".events owner to sales_owner;
    alter table "Sales Ops".events_old owner to sales_owner;
    alter table "Sales Ops".events_recent owner to sales_owner;
    alter table "Sales Ops".events_default owner to sales_owner;
  ]])
  exec(conn, ([[insert into "Sales Ops"."Customer" ("Name", email, created_at)
    select 'Customer ' || g, 'c' || g || '@example.com', %s from generate_series(1, %d) g]]):format(spread, n(400)))
  exec(conn, ([[insert into "Sales Ops"."Order" ("CustomerId", status, amount, invoice_no, created_at)
    select 1 + g %% %d, (array['new','paid','shipped','cancelled']::"Sales Ops".order_status[])[1 + g %% 4],
      (g * 1.000000123456789123)::numeric + 1 / 7.0::numeric(40, 30), nextval('"Sales Ops".invoice_seq'), %s
    from generate_series(1, %d) g]]):format(n(400), spread, n(2000)))
  exec(conn, [[insert into "Sales Ops"."OrderLine" (order_id, line_no, qty, unit_cents, created_at)
    select o.id, l, 1 + (o.id + l) % 5, 100 + (o.id * l) % 9900, o.created_at
    from "Sales Ops"."Order" o, generate_series(1, 3) l]])
  exec(conn, ([[insert into "Sales Ops"."Document" (title, body, created_at)
    select 'doc ' || g, case when g %% 5 = 1 then %s
      else jsonb_build_object('id', g, 'text', repeat(md5(g::text), 4)) end, %s
    from generate_series(1, %d) g]]):format(BIG_JSON:format("g", "g"), spread, n(60)))
  exec(conn, ([[insert into "Sales Ops"."group" (id, name, created_at)
    select g, 'group ' || g, %s from generate_series(1, %d) g]]):format(spread, n(50)))
  exec(conn, ([[insert into "Sales Ops".events (id, kind, created_at)
    select g, (array['view','click','buy'])[1 + g %% 3], %s from generate_series(1, %d) g]]):format(spread, n(3000)))
  -- scheduled ones, past the last bound: the default partition
  exec(conn, ([[insert into "Sales Ops".events (id, kind, created_at)
    select g, 'scheduled', now() + interval '60 days' + g * interval '1 hour' from generate_series(1, %d) g]])
    :format(n(50)))
  exec(conn, ([[insert into "Sales Ops".private_note (id, author, note, created_at)
    select g, case when g %% 2 = 0 then 'alice' else 'bob' end, 'note ' || g, %s
    from generate_series(1, %d) g]]):format(spread, n(100)))
  exec(conn, ([[insert into public.page_hits (customer_id, url, created_at)
    select 1 + g %% 400, '/p/' || g %% 50, %s from generate_series(1, %d) g]]):format(spread, n(1000)))
  exec(conn, "analyze")
  return true
end

--[[ awkward.workload(conn, opts): a workload touching every feature, on
demo.drive (opts as there): customers and orders (identity ALWAYS), order
lines (generated column, composite key), status changes (the trigger into
OrderHistory), deletes that cascade, amounts with many decimals, invoice
numbers from the standalone sequence, ~200 KB documents, events in the
partitions, updates of "group" (the ENABLE ALWAYS trigger), private notes,
page hits (inserts only: no primary key). ]]
function awkward.workload(conn, opts)
  opts = opts or {}
  local next_group, next_note, next_event = 100000, 100000, 1000000
  return demo.drive(conn, opts, function(run, done)
    local r = math.random(100)
    local function count(kind, affected) done[kind] = done[kind] + affected end
    if r <= 20 then
      count("inserts", run([[insert into "Sales Ops"."Customer" ("Name", email) values ($1, $2)]],
        "live " .. math.random(1e6), "live" .. math.random(1e6) .. "@example.com"))
      count("inserts", run([[with o as (
          insert into "Sales Ops"."Order" ("CustomerId", amount, invoice_no)
          values ((select max("CustomerId") from "Sales Ops"."Customer"), $1::numeric,
                  nextval('"Sales Ops".invoice_seq')) returning id)
        insert into "Sales Ops"."OrderLine" (order_id, line_no, qty, unit_cents)
        select o.id, l, l, 250 * l from o, generate_series(1, 2) l]],
        ("%d.%06d%09d%03d"):format(math.random(1e6), math.random(0, 999999), math.random(0, 999999999),
          math.random(0, 999))))
    elseif r <= 35 then
      count("updates", run([[update "Sales Ops"."Order" set status = $1::"Sales Ops".order_status,
          amount = amount + 0.000000000000000001 where id = (select max(id) - $2 from "Sales Ops"."Order")]],
        ({ "paid", "shipped", "cancelled" })[math.random(3)], math.random(0, 50)))
    elseif r <= 45 then
      count("updates", run([[update "Sales Ops"."OrderLine" set qty = qty + 1
        where (order_id, line_no) = (select order_id, line_no from "Sales Ops"."OrderLine"
                                     order by order_id desc, line_no limit 1 offset $1)]], math.random(0, 100)))
    elseif r <= 50 then
      -- cascades to its lines on the source; the lines' deletes are in the WAL too
      count("deletes", run([[delete from "Sales Ops"."Order" where id = (select min(id) + $1 from "Sales Ops"."Order")]],
        math.random(0, 300)))
    elseif r <= 55 then
      count("inserts", run(([[insert into "Sales Ops"."Document" (title, body) values ('live', %s)]])
        :format(r == 55 and BIG_JSON:format("$1::int", "$1::int") or "jsonb_build_object('n', $1::int)"),
        math.random(1e6)))
    elseif r <= 60 then
      count("updates", run([[update "Sales Ops"."Document" set body = body || '{"seen": true}'
        where id = (select min(id) + $1 from "Sales Ops"."Document")]], math.random(0, 40)))
    elseif r <= 70 then
      count("updates", run([[update "Sales Ops"."group" set name = name || '.' where id = $1]], math.random(1, 50)))
      if r == 70 then
        next_group = next_group + 1
        count("inserts", run([[insert into "Sales Ops"."group" (id, name) values ($1, 'live')]], next_group))
      end
    elseif r <= 82 then
      next_event = next_event + 1
      count("inserts", run([[insert into "Sales Ops".events (id, kind, created_at) values ($1, 'live', now())]],
        next_event))
      if r == 82 then
        -- a row moved from one partition to another: a delete and an insert in the WAL (an update of
        -- the key within one partition would be one DMS ignores)
        count("updates", run([[update "Sales Ops".events set kind = 'moved', created_at = now()
          where created_at < now() - interval '100 days'
            and id = (select min(id) + $1 from "Sales Ops".events where created_at < now() - interval '100 days')]],
          math.random(0, 20)))
      end
    elseif r <= 88 then
      next_note = next_note + 1
      count("inserts", run([[insert into "Sales Ops".private_note (id, author, note) values ($1, $2, 'live')]],
        next_note, math.random(2) == 1 and "alice" or "bob"))
      count("updates", run([[update "Sales Ops".private_note set note = note || '!' where id = $1]],
        math.random(1, 100)))
    else
      count("inserts", run([[insert into public.page_hits (customer_id, url) values ($1, '/live')]],
        math.random(400)))
    end
  end)
end

return awkward
