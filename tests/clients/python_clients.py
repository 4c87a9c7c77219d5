"""Weir through Python's drivers: psycopg 3 (both protocols, server-side cursors over
SUBSCRIBE) and SQLAlchemy's inspector.

Run by tests/clients.rs against a fresh server: python3 python_clients.py PORT
Exits non-zero with a message on the first mismatch.
"""

import datetime
import decimal
import sys

import psycopg
import sqlalchemy


def check(actual, expected, what):
    if actual != expected:
        sys.exit(f"{what}: expected {expected!r}, got {actual!r}")


def psycopg_round_trip(dsn):
    # psycopg wraps statements in BEGIN/COMMIT unless autocommit is on; both must work.
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "CREATE TABLE py_orders (id BIGINT NOT NULL, item STRING, price DECIMAL(8, 2), "
            "day DATE, at TIMESTAMP(6), paid BOOLEAN, PRIMARY KEY (id) NOT ENFORCED)"
        )
        conn.commit()
        with conn.cursor() as cur:
            # Server-side parameters go through the extended protocol.
            cur.executemany(
                "INSERT INTO py_orders VALUES (%s, %s, %s, %s, %s, %s)",
                [
                    (1, "tea", decimal.Decimal("3.50"), datetime.date(2024, 1, 2),
                     datetime.datetime(2024, 1, 2, 3, 4, 5), True),
                    (2, "cake", decimal.Decimal("12.00"), datetime.date(2024, 1, 3),
                     datetime.datetime(2024, 1, 3, 4, 5, 6, 700000), False),
                ],
            )
            conn.commit()
            cur.execute("SELECT id, item, price, day, at, paid FROM py_orders WHERE id >= %s ORDER BY id", (1,))
            rows = cur.fetchall()
            check(rows, [
                (1, "tea", decimal.Decimal("3.50"), datetime.date(2024, 1, 2),
                 datetime.datetime(2024, 1, 2, 3, 4, 5), True),
                (2, "cake", decimal.Decimal("12.00"), datetime.date(2024, 1, 3),
                 datetime.datetime(2024, 1, 3, 4, 5, 6, 700000), False),
            ], "psycopg rows")
            check([d.name for d in cur.description], ["id", "item", "price", "day", "at", "paid"],
                  "psycopg column names")
            # Binary results.
            cur.execute("SELECT sum(price), count(*) FROM py_orders", binary=True)
            check(cur.fetchone(), (decimal.Decimal("15.50"), 2), "psycopg binary aggregate")
            # Errors carry SQLSTATEs.
            try:
                cur.execute("SELECT * FROM no_such_table")
                sys.exit("expected an error for an unknown table")
            except psycopg.errors.UndefinedTable:
                conn.rollback()
    # Autocommit and the simple protocol (no parameters, several statements).
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO py_orders (id, item) VALUES (3, 'jam'); INSERT INTO py_orders (id) VALUES (4)")
        check(conn.execute("SELECT count(*) FROM py_orders").fetchone(), (4,), "psycopg autocommit count")
        check(conn.execute("SHOW TimeZone").fetchone(), ("UTC",), "psycopg SHOW")


def psycopg_follows_a_view(dsn):
    """A server-side cursor over SUBSCRIBE: how psycopg (and JDBC) follow a view."""
    with psycopg.connect(dsn, autocommit=True) as writer:
        writer.execute(
            "CREATE TABLE py_clicks (id BIGINT, item STRING, PRIMARY KEY (id) NOT ENFORCED)")
        writer.execute(
            "CREATE MATERIALIZED VIEW py_per_item AS "
            "SELECT item, count(*) AS n FROM py_clicks GROUP BY item")
        writer.execute("INSERT INTO py_clicks VALUES (1, 'tea'), (2, 'jam')")
        writer.execute("FLUSH")
        with psycopg.connect(dsn) as reader:
            # A named cursor: DECLARE "feed" CURSOR FOR ..., then FETCH FORWARD n FROM "feed".
            with reader.cursor(name="feed") as feed:
                feed.execute("SUBSCRIBE TO py_per_item")
                check(sorted(feed.fetchmany(10)), [("+I", "jam", 1), ("+I", "tea", 1)],
                      "SUBSCRIBE snapshot")
                # One statement (so one epoch): a new click, and an upsert that moves
                # click 2 from jam to tea.
                writer.execute("INSERT INTO py_clicks VALUES (2, 'tea'), (3, 'tea')")
                writer.execute("FLUSH")
                changes = []
                while len(changes) < 3:
                    changes += feed.fetchmany(10)
                check(sorted(changes), [("+U", "tea", 3), ("-D", "jam", 1), ("-U", "tea", 1)],
                      "SUBSCRIBE changes")
                # With a timeout, FETCH returns what there is: nothing.
                waited = reader.execute("FETCH 10 FROM feed WITH (timeout = '100ms')").fetchall()
                check(waited, [], "FETCH with a timeout")
            reader.rollback()


def sqlalchemy_inspector(port):
    engine = sqlalchemy.create_engine(f"postgresql+psycopg://weir@127.0.0.1:{port}/weir")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("CREATE VIEW py_paid AS SELECT id, price FROM py_orders WHERE paid"))
        conn.commit()
        check(conn.execute(sqlalchemy.text("SELECT count(*) FROM py_paid")).scalar(), 1, "sqlalchemy view")
    inspector = sqlalchemy.inspect(engine)
    check(inspector.get_table_names(), ["py_orders"], "get_table_names")
    check(inspector.get_view_names(), ["py_paid"], "get_view_names")
    columns = inspector.get_columns("py_orders")
    check([c["name"] for c in columns], ["id", "item", "price", "day", "at", "paid"], "get_columns names")
    check([c["nullable"] for c in columns], [False, True, True, True, True, True], "get_columns nullable")
    check([type(c["type"]).__name__ for c in columns],
          ["BIGINT", "TEXT", "NUMERIC", "DATE", "TIMESTAMP", "BOOLEAN"], "get_columns types")
    engine.dispose()


def main():
    port = sys.argv[1]
    dsn = f"host=127.0.0.1 port={port} user=weir dbname=weir"
    psycopg_round_trip(dsn)
    sqlalchemy_inspector(port)
    psycopg_follows_a_view(dsn)
    print("python clients ok")


if __name__ == "__main__":
    main()
