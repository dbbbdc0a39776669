#!/usr/bin/env python3
"""The Golconde demo: pgbench's own workload distributed by triggers, and the slides' friendships
packets distributed by the client flow, each from one canonical database to two target databases,
then ``golconde compare`` proving every target equals its canonical table.

Run through ``make demo`` / ``scripts/demo.sh`` (which set everything up first). Options:
``--scale N`` (pgbench -s, default 1), ``--clients N`` (default 4), ``--seconds N`` (pgbench -T,
default 20), ``--timeout N`` (seconds to wait for the targets to catch up, default 600).
Environment: PGHOST/PGPORT/PGUSER (default 127.0.0.1/5432/postgres), GOLCONDE_STOMP (default
127.0.0.1:61613), GOLCONDE_STOMP_LOGIN/PASSCODE (guest/guest).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import psycopg2
import yaml
from psycopg2 import sql

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
WORK = os.path.join(ROOT, "var", "demo")
PGBENCH_TABLES = ("pgbench_branches", "pgbench_tellers", "pgbench_accounts", "pgbench_history")
DATABASES = ("golconde_canonical", "golconde_target1", "golconde_target2")
FRIENDSHIPS = """
CREATE TABLE public.friendships (
    id serial PRIMARY KEY, friend_id integer NOT NULL, user_id integer NOT NULL,
    status_id integer, "timestamp" timestamptz, UNIQUE (friend_id, user_id))
"""
SLIDES = [  # the 2009 slides' packets, as printed (upper case), plus a few more
    '{"ACTION": "ADD", "DATA": {"FRIEND_ID": 47, "USER_ID": 16, "STATUS_ID": 1}}',
    '{"ACTION": "ADD", "DATA": {"FRIEND_ID": 11, "USER_ID": 126, "STATUS_ID": 1}}',
    '{"ACTION": "ADD", "DATA": {"FRIEND_ID": 5, "USER_ID": 41, "STATUS_ID": 1}}',
    '{"ACTION": "DELETE", "RESTRICTION": {"FRIEND_ID": 11, "USER_ID": 126}}',
    '{"ACTION": "SET", "DATA": {"FRIEND_ID": 112, "USER_ID": 111, "TIMESTAMP": "WED APR 1 13:56:54 2009", "STATUS_ID": 1}}',
    '{"ACTION": "UPDATE", "RESTRICTION": {"FRIEND_ID": 5, "USER_ID": 41}, "DATA": {"TIMESTAMP": "WED APR 1 13:56:38 2009", "STATUS_ID": 3}}',
]


def step(text: str) -> None:
    print("\n==> %s" % text, flush=True)


def pg_env() -> dict:
    env = dict(os.environ)
    env.setdefault("PGHOST", "127.0.0.1")
    env.setdefault("PGPORT", "5432")
    env.setdefault("PGUSER", "postgres")
    return env


def dsn(dbname: str) -> str:
    env = pg_env()
    return psycopg2.extensions.make_dsn(host=env["PGHOST"], port=env["PGPORT"], user=env["PGUSER"], dbname=dbname)


def run(*argv: str) -> None:
    print("    $ %s" % " ".join(argv), flush=True)
    subprocess.run(argv, check=True, env=pg_env())


def recreate_databases() -> None:
    conn = psycopg2.connect(dsn("postgres"))
    conn.autocommit = True
    with conn.cursor() as cur:
        for name in DATABASES:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    conn.close()


def write_config(http_port: int) -> str:
    stomp = os.environ.get("GOLCONDE_STOMP", "127.0.0.1:61613")
    with open(os.path.join(ROOT, "etc", "golconde.yaml")) as handle:
        example = yaml.safe_load(handle)
    config = {
        "Logging": {"filename": os.path.join(WORK, "golconded.log"), "level": "info",
                    "format": "%(asctime)s %(levelname)-8s %(threadName)s: %(message)s"},
        "HTTPServer": {"enabled": True, "listen": "127.0.0.1", "port": http_port},
        "Broker": {"login": os.environ.get("GOLCONDE_STOMP_LOGIN", "guest"),
                   "passcode": os.environ.get("GOLCONDE_STOMP_PASSCODE", "guest"), "heartbeat": 10000},
        "Destinations": {},
    }
    # client flow: the example configuration's Friendships destination, DSNs completed
    friendships = example["Destinations"]["Friendships"]
    friendships["pgsql"] = dsn("golconde_canonical")
    friendships["stomp"] = stomp
    for name, target in friendships["Targets"].items():
        target["pgsql"] = dsn("golconde_%s" % name)
        target["stomp"] = stomp
    config["Destinations"]["Friendships"] = friendships
    # trigger flow: one destination per pgbench table
    for table in PGBENCH_TABLES:
        name = table.replace("pgbench_", "Pgbench_")
        queue = "/queue/golconde.demo.%s" % table
        config["Destinations"][name] = {
            "mode": "trigger", "stomp": stomp, "queue": queue, "pgsql": dsn("golconde_canonical"),
            "target": "public.%s" % table, "poll_interval": 0.5,
            "Targets": {t: {"stomp": stomp, "queue": "%s.%s" % (queue, t), "pgsql": dsn("golconde_%s" % t),
                            "target": "public.%s" % table} for t in ("target1", "target2")},
        }
    path = os.path.join(WORK, "golconde.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    return path


def backlog() -> int:
    """Captured rows not sent yet, over the demo's trigger-mode destinations (by each drain's
    saved position: sent rows stay in golconde.queue until their partition is truncated, after
    500,000 ids)."""
    sys.path.insert(0, ROOT)
    from golconde import trigger
    conn = psycopg2.connect(dsn("golconde_canonical"))
    try:
        with conn.cursor() as cur:
            return sum(trigger.backlog(cur, table.replace("pgbench_", "Pgbench_"))[0]
                       for table in PGBENCH_TABLES)
    finally:
        conn.close()


def compare(config: str, quiet: bool) -> bool:
    result = subprocess.run([os.path.join(BIN, "golconde"), "compare", "-c", config],
                            capture_output=True, text=True, env=pg_env())
    if not quiet:
        print(result.stdout + result.stderr, end="")
    return result.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--http-port", type=int, default=8080)
    args = parser.parse_args()
    os.makedirs(WORK, exist_ok=True)

    step("Databases %s (dropped and created again)" % ", ".join(DATABASES))
    recreate_databases()
    step("pgbench tables (no rows yet) in each database, friendships table in each database")
    for name in DATABASES:
        run("pgbench", "-i", "-I", "dtp", "-s", str(args.scale), name)
        conn = psycopg2.connect(dsn(name))
        with conn.cursor() as cur:
            cur.execute(FRIENDSHIPS)
        conn.commit()
        conn.close()
    config = write_config(args.http_port)
    golconde = os.path.join(BIN, "golconde")
    step("Capture triggers on the canonical pgbench tables")
    for table in PGBENCH_TABLES:
        run(golconde, "trigger", "install", "-c", config, "--destination", table.replace("pgbench_", "Pgbench_"))

    step("golconded (log: %s, live page: http://127.0.0.1:%d/)" % (os.path.join(WORK, "golconded.log"), args.http_port))
    daemon = subprocess.Popen([os.path.join(BIN, "golconded"), "-f", "-c", config], env=pg_env())
    try:
        time.sleep(2)
        if daemon.poll() is not None:
            print("golconded exited with status %s" % daemon.returncode)
            return 1
        step("Client flow: the slides' friendships packets, sent with 'golconde send'")
        proc = subprocess.run([golconde, "send", "-c", config, "--destination", "Friendships"],
                              input="\n".join(SLIDES) + "\n", text=True, env=pg_env())
        if proc.returncode:
            return proc.returncode
        step("Trigger flow: pgbench -i data generation (scale %d) in the canonical database" % args.scale)
        run("pgbench", "-i", "-I", "g", "-s", str(args.scale), "golconde_canonical")
        step("Trigger flow: pgbench TPC-B-like run, %d clients, %d s" % (args.clients, args.seconds))
        run("pgbench", "-c", str(args.clients), "-j", str(min(args.clients, 2)), "-T", str(args.seconds),
            "-n", "golconde_canonical")
        step("Waiting for the targets to catch up (queue table backlog, then compare)")
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            pending = backlog()
            if pending == 0 and compare(config, quiet=True):
                break
            print("    captured rows not sent yet: %d" % pending, flush=True)
            time.sleep(3)
        step("golconde compare -c %s" % os.path.relpath(config, ROOT))
        equal = compare(config, quiet=False)
    finally:
        step("Stopping golconded (SIGTERM)")
        daemon.send_signal(signal.SIGTERM)
        try:
            print("    golconded exited with status %d" % daemon.wait(15))
        except subprocess.TimeoutExpired:
            daemon.kill()
            print("    golconded did not stop within 15 s: killed")
    print("\nDEMO %s" % ("PASSED: every target equals its canonical table" if equal else "FAILED: differences above"))
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
