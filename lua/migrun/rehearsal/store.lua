--[[
migrun.rehearsal.store: an online store with a room-booking side, shaped like
a real application's schema rather than a test fixture, and a workload that
writes every table all the time, for rehearsals of a migration under writes
(tests/spec/e2e_store_spec.lua, bench/cutover.lua):

  demo.rehearsal{ dir = ..., sample = "migrun.rehearsal.store" }

What is in it:
  * two schemas (public and booking), and a default configuration: no
    `schemas` (every non-system schema is migrated);
  * domains (email_address, money_amount), enums (order_status,
    reservation_status), a range column (booking.reservations.during);
  * arrays of every kind an application keeps: text[] and int[] (some '{}',
    some with NULL elements), a 2-D int[][] (product dimensions), jsonb[];
  * full-text search columns kept by triggers (customers.search,
    products.search: tsvector_update_trigger), a stored generated column
    (products.price_with_tax) and an identity GENERATED ALWAYS key (customers);
  * orders numbered from a sequence no column owns (order_numbers), a
    standalone sequence (invoice_numbers), a composite key (order_items),
    foreign keys, a uuid key (coupons, booking.reservations);
  * a table partitioned by month (events, with a jsonb[] column);
  * a table without a primary key and without any timestamp column
    (audit_log: the application only appends to it, the only change DMS can
    carry there), and tables without any timestamp column (inventory,
    order_items, booking.guest_notes);
  * a view, a function the workload calls (place_order), and materialized
    views with (daily_sales) and without (top_products) a unique index.

  store.load_sample(conn, { scale = 1 })     -- on the source primary
  store.workload(conn, opts)                 -- demo.drive's options: writes every table
  store.config_defaults()
]]
local demo = require "migrun.rehearsal.demo"

local store = {}

local SCHEMA = [[
  create domain email_address as text check (value ~ '^[^@]+@[^@]+$');
  create domain money_amount as numeric(12,2) check (value >= 0);
  create type order_status as enum ('cart', 'placed', 'paid', 'shipped', 'cancelled');
  create sequence order_numbers start 100000;
  create sequence invoice_numbers;

  create table customers (
    id bigint generated always as identity primary key,
    email email_address not null unique,
    full_name text not null,
    tags text[] not null default '{}',
    search tsvector,
    created_at timestamptz not null default now());
  create trigger customers_search before insert or update on customers
    for each row execute function tsvector_update_trigger(search, 'pg_catalog.english', full_name, email);

  create table products (
    sku text primary key,
    title text not null,
    description text,
    price money_amount not null,
    price_with_tax numeric(12,2) generated always as (price * 1.20) stored,
    category_ids int[] not null default '{}',
    dims int[][],
    attributes jsonb not null default '{}',
    search tsvector,
    updated_at timestamptz not null default now());
  create trigger products_search before insert or update on products
    for each row execute function tsvector_update_trigger(search, 'pg_catalog.english', title, description);
  create index products_search_idx on products using gin (search);

  create table inventory (sku text primary key references products, on_hand int not null, reserved int not null);

  create table orders (
    id bigint primary key default nextval('order_numbers'),
    customer_id bigint not null references customers,
    status order_status not null default 'cart',
    total money_amount not null default 0,
    notes text[],
    invoice bigint,
    placed_at timestamptz not null default now());
  create index orders_customer_idx on orders (customer_id);

  create table order_items (
    order_id bigint not null references orders on delete cascade,
    line smallint not null,
    sku text not null references products,
    qty int not null check (qty > 0),
    price money_amount not null,
    primary key (order_id, line));

  create table coupons (code uuid primary key default gen_random_uuid(), percent int not null, uses int not null default 0,
    valid_until date);

  create table events (id bigint not null, occurred_at timestamptz not null, kind text not null, payload jsonb,
    labels jsonb[], primary key (id, occurred_at)) partition by range (occurred_at);
  create table events_old partition of events for values from (minvalue) to ('2026-01-01');
  create table events_2026 partition of events for values from ('2026-01-01') to ('2027-01-01');
  create table events_later partition of events for values from ('2027-01-01') to (maxvalue);
  create sequence events_id_seq owned by events.id;

  create table audit_log (actor text not null, action text not null, detail jsonb);

  create view order_totals as
    select o.id, o.customer_id, sum(i.qty * i.price) as total from orders o join order_items i on i.order_id = o.id
     group by o.id, o.customer_id;

  create function place_order(p_customer bigint, p_sku text, p_qty int) returns bigint language plpgsql as $$
  declare
    o bigint;
    p numeric;
  begin
    select price into p from products where sku = p_sku;
    insert into orders (customer_id, status, total, notes) values (p_customer, 'placed', p * p_qty, '{}') returning id into o;
    insert into order_items values (o, 1, p_sku, p_qty, p);
    update inventory set reserved = reserved + p_qty where sku = p_sku;
    insert into audit_log values ('shop', 'place_order', jsonb_build_object('order', o, 'sku', p_sku));
    return o;
  end $$;

  create schema booking;
  create type booking.reservation_status as enum ('held', 'confirmed', 'cancelled');
  create table booking.rooms (id int primary key, name text not null, amenities text[] not null default '{}',
    features jsonb[] not null default '{}', beds int[]);
  create table booking.reservations (id uuid primary key default gen_random_uuid(),
    room_id int not null references booking.rooms, guest_id bigint not null references customers,
    during tstzrange not null, status booking.reservation_status not null default 'held',
    created_at timestamptz not null default now());
  create table booking.guest_notes (guest_id bigint primary key references customers, note text not null);

  create materialized view daily_sales as
    select date_trunc('day', placed_at)::date as day, count(*) as orders, sum(total) as revenue
      from orders where status <> 'cancelled' group by 1;
  create unique index daily_sales_day on daily_sales (day);
  create materialized view top_products as
    select sku, sum(qty) as sold from order_items group by sku order by 2 desc limit 20;
]]

local function exec(conn, sql, ...)
  return assert(conn:exec(sql, ...))
end

function store.load_sample(conn, opts)
  opts = opts or {}
  local scale = opts.scale or 1
  local n = function(x) return math.max(1, math.floor(x * scale)) end
  exec(conn, SCHEMA)
  local spread = "now() - (random() * interval '365 days')"
  exec(conn, ([[insert into customers (email, full_name, tags, created_at)
    select 'c' || g || '@shop.example', 'Customer ' || g,
      case g %% 4 when 0 then '{}' when 1 then array['vip'] when 2 then array['b2b', null] else array['a', 'b'] end, %s
      from generate_series(1, %d) g]]):format(spread, n(4000)))
  exec(conn, ([=[insert into products (sku, title, description, price, category_ids, dims, attributes)
    select 'sku-' || g, 'Product ' || g, repeat('a fine thing ', 1 + g %% 20), (g %% 500) + 0.99,
      case g %% 3 when 0 then '{}' when 1 then array[g %% 10, null] else array[1, 2, 3] end,
      case when g %% 5 = 0 then null else array[[g %% 7, 2], [3, 4]] end,
      jsonb_build_object('color', (array['red','blue','green'])[1 + g %% 3], 'weight', g %% 30)
      from generate_series(1, %d) g]=]):format(n(2000)))
  exec(conn, "insert into inventory select sku, 100, 0 from products")
  exec(conn, ([[insert into orders (customer_id, status, total, notes, invoice, placed_at)
    select 1 + g %% %d, (array['placed','paid','shipped','cancelled']::order_status[])[1 + g %% 4], 0,
      case g %% 3 when 0 then null when 1 then '{}' else array['gift wrap', null] end,
      case when g %% 2 = 0 then nextval('invoice_numbers') end, %s
      from generate_series(1, %d) g]]):format(n(4000), spread, n(20000)))
  exec(conn, ([[insert into order_items
    select o.id, l, 'sku-' || (1 + (o.id * l) %% %d), 1 + l, 9.99 from orders o, generate_series(1, 3) l]]):format(n(2000)))
  exec(conn, "update orders o set total = t.total from order_totals t where t.id = o.id")
  exec(conn, ([[insert into coupons (percent, valid_until)
    select 5 + g %% 30, current_date + g %% 90 from generate_series(1, %d) g]]):format(n(500)))
  exec(conn, ([[insert into events (id, occurred_at, kind, payload, labels)
    select nextval('events_id_seq'), timestamptz '2025-06-01' + g * interval '13 minutes',
      (array['view','click','search'])[1 + g %% 3], jsonb_build_object('n', g, 'pad', repeat('x', g %% 200)),
      case g %% 4 when 0 then '{}' when 1 then array['{"a": 1}'::jsonb, '[1, 2]'] else null end
      from generate_series(1, %d) g]]):format(n(60000)))
  exec(conn, ([[insert into audit_log select 'seed', 'import', jsonb_build_object('row', g)
      from generate_series(1, %d) g]]):format(n(5000)))
  exec(conn, ([[insert into booking.rooms select g, 'Room ' || g,
      case g %% 2 when 0 then '{}' else array['wifi', 'desk'] end,
      array[jsonb_build_object('floor', g %% 5)], case when g %% 3 = 0 then array[1, null] else array[2] end
      from generate_series(1, %d) g]]):format(n(200)))
  exec(conn, ([[insert into booking.reservations (room_id, guest_id, during, status, created_at)
    select 1 + g %% %d, 1 + g %% %d,
      tstzrange(now() + g * interval '1 hour', now() + g * interval '1 hour' + interval '2 days'),
      (array['held','confirmed','cancelled']::booking.reservation_status[])[1 + g %% 3], %s
      from generate_series(1, %d) g]]):format(n(200), n(4000), spread, n(8000)))
  exec(conn, ([[insert into booking.guest_notes select g, 'prefers ' || (array['quiet','view','early'])[1 + g %% 3]
      from generate_series(1, %d) g]]):format(n(1000)))
  exec(conn, "refresh materialized view daily_sales; refresh materialized view top_products; analyze")
  return true
end

-- One transaction of the application, chosen at random; every table is
-- written: inserts, updates and deletes (appends only to audit_log).
local ACTIONS = {
  function(run, done, n) -- a new order through the application's function
    run("select place_order($1, $2, $3)", 1 + math.random(n.customers) - 1, "sku-" .. math.random(n.products),
      math.random(3))
    done.inserts = done.inserts + 4
  end,
  function(run, done, n) -- an order paid, shipped or cancelled; a line removed
    local id = 100000 + math.random(n.orders) - 1
    done.updates = done.updates + run("update orders set status = (array['paid','shipped','cancelled']::order_status[])"
      .. "[1 + $2::int % 3], notes = array_append(coalesce(notes, '{}'), 'step') where id = $1", id, math.random(3))
    done.deletes = done.deletes + run("delete from order_items where order_id = $1 and line = 3", id)
  end,
  function(run, done, n) -- a customer signs up, another edits their profile, one leaves a note
    done.inserts = done.inserts + run("insert into customers (email, full_name) values ($1, 'New customer')",
      ("new%d.%d@shop.example"):format(math.random(1e9), math.random(1e6)))
    done.updates = done.updates + run("update customers set tags = array_append(tags, 'seen') where id = $1",
      math.random(n.customers))
    done.inserts = done.inserts + run([[insert into booking.guest_notes values ($1, 'live')
      on conflict (guest_id) do update set note = excluded.note || '!']], math.random(n.customers))
  end,
  function(run, done, n) -- the catalogue changes; stock moves
    local sku = "sku-" .. math.random(n.products)
    done.updates = done.updates + run("update products set price = price + 1, category_ids = '{}', "
      .. "attributes = attributes || '{\"sale\": true}', updated_at = now() where sku = $1", sku)
    done.updates = done.updates + run("update inventory set on_hand = on_hand - 1 where sku = $1", sku)
  end,
  function(run, done) -- browsing: events arrive, old ones are purged
    done.inserts = done.inserts + run([[insert into events values (nextval('events_id_seq'), now(), 'view',
      '{"live": true}', array['{"k": "v"}'::jsonb])]])
    done.deletes = done.deletes + run("delete from events where id = (select min(id) from events_old)")
    done.updates = done.updates + run("update events set kind = 'seen' where id = (select max(id) from events_2026)")
  end,
  function(run, done, n) -- coupons used, created, expired
    done.updates = done.updates + run("update coupons set uses = uses + 1 where code = (select code from coupons "
      .. "order by uses, code limit 1)")
    done.inserts = done.inserts + run("insert into coupons (percent) values ($1)", math.random(50))
    done.deletes = done.deletes + run("delete from coupons where code = (select code from coupons where uses > 0 "
      .. "order by code desc limit 1) and $1::int > 0", n.products)
  end,
  function(run, done, n) -- rooms booked, confirmed, cancelled; a room's amenities
    done.inserts = done.inserts + run([[insert into booking.reservations (room_id, guest_id, during)
      values ($1, $2, tstzrange(now(), now() + interval '1 day'))]], math.random(n.rooms), math.random(n.customers))
    done.updates = done.updates + run("update booking.reservations set status = 'confirmed' where id = "
      .. "(select id from booking.reservations where status = 'held' order by created_at desc limit 1)")
    done.updates = done.updates + run("update booking.rooms set amenities = case when amenities = '{}' then "
      .. "array['wifi'] else '{}' end where id = $1", math.random(n.rooms))
    done.deletes = done.deletes + run("delete from booking.reservations where id = (select id from "
      .. "booking.reservations where status = 'cancelled' order by created_at limit 1)")
  end,
}

function store.workload(conn, opts)
  opts = opts or {}
  -- how many of each the sample loaded (whatever its scale)
  local res = assert(conn:exec([[select (select count(*) from customers) as customers,
    (select count(*) from products) as products, (select count(*) from orders) as orders,
    (select count(*) from booking.rooms) as rooms]]))
  local n = res[1]
  return demo.drive(conn, opts, function(run, done)
    ACTIONS[math.random(#ACTIONS)](run, done, n)
    run("insert into audit_log values ('app', 'request', null)")
    done.inserts = done.inserts + 1
  end)
end

function store.config_defaults()
  return {
    -- no `schemas`: every non-system schema, as a new user's first config would have it
    groups = { largest_alone = 2 },
    qa = { large_tables = 3, small_sample = 5 },
    -- audit_log has no key: only its inserts replicate (the workload only appends)
  }
end

return store
