"""Golconde's reliability ("chaos") suite: faults injected into a real golconded while a stream of
packets flows, then the end state counted.

    python chaos/run.py                                   # everything at the issue's size
    python chaos/run.py --scenarios kill --flows client --packets 20000 --kills 5
    make chaos ARGS="--scenarios broker,reload"

For each scenario on each flow (client, trigger): fresh databases (canonical, target1, target2)
and queues, one destination with two targets, golconded as a subprocess, a stream of ``--packets``
changes (:mod:`chaos.workload`), the faults (:mod:`chaos.scenarios`), then the figures: packets
sent, applied at the canonical table and at each target, dead-lettered, lost, double-applied,
restarts survived, duration, and each target compared with the canonical table. Exits 1 when any
scenario lost, doubled, dead-lettered or differed, 2 on a usage or set-up error.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import time
from typing import Callable, List, Optional

if __package__ in (None, ""):          # run as a script: python chaos/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "chaos"              # noqa: A001 - so that the relative imports below work

from tests.conftest import PG_DSN, RABBITMQ, Broker  # noqa: E402

from . import scenarios, services, workload  # noqa: E402
from .harness import FlowRun, Result  # noqa: E402

LOGGER = logging.getLogger("chaos")

SCENARIOS = ("kill", "broker", "target-pg", "stuck", "reload", "sigterm")
FLOWS = ("client", "trigger")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def csv(choices: tuple) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError("expected a comma-separated subset of %s, got %r"
                                             % (",".join(choices), text))
        return items
    return parse


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="chaos/run.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--scenarios", type=csv(SCENARIOS), default=",".join(SCENARIOS),
                        help="scenarios to run, comma-separated: " + ",".join(SCENARIOS))
    parser.add_argument("--flows", type=csv(FLOWS), default=",".join(FLOWS), help="client,trigger")
    parser.add_argument("--packets", type=int, default=100000, help="packets (changes) per stream")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="packets per second the stream is sent at (0: as fast as possible)")
    parser.add_argument("--kills", type=int, default=20, help="kill -9 of golconded per stream")
    parser.add_argument("--broker-restarts", type=int, default=3, help="broker stop/start per stream")
    parser.add_argument("--pg-down", type=float, default=10.0,
                        help="seconds target1's PostgreSQL stays down after its crash")
    parser.add_argument("--lock-seconds", type=float, default=60.0, help="seconds target1's table is locked")
    parser.add_argument("--sigterms", type=int, default=5, help="SIGTERM + restart per stream")
    parser.add_argument("--seed", type=int, default=None, help="random seed of the stream and of the fault choices (default: a random one, printed)")
    parser.add_argument("--dsn", default=PG_DSN, help="maintenance DSN of the shared PostgreSQL")
    parser.add_argument("--pg-port", type=int, default=5545, help="port of the private PostgreSQL")
    parser.add_argument("--rabbit-stomp-port", type=int, default=61633,
                        help="STOMP port of the private RabbitMQ node (AMQP: 5682, distribution: 25682)")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "var", "chaos"),
                        help="configurations, daemon logs, private services' data")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the databases and queues")
    args = parser.parse_args(argv)
    if args.packets < 1000:
        parser.error("--packets: at least 1000")
    return args


class Services:
    """The private RabbitMQ node and PostgreSQL cluster, started on first use, stopped at the end."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rabbit: Optional[services.PrivateRabbit] = None
        self.cluster: Optional[services.PrivateCluster] = None

    def private_rabbit(self) -> services.PrivateRabbit:
        """The private RabbitMQ node, started (the first call starts it). :raises ServiceError:"""
        if self.rabbit is None:
            rabbit = services.PrivateRabbit(self.args.workdir, stomp_port=self.args.rabbit_stomp_port)
            LOGGER.info("starting the private RabbitMQ node %s (STOMP %d)", rabbit.node,
                        rabbit.stomp_port)
            self.rabbit = rabbit          # stopped at the end even if its start fails half-way
            rabbit.start()
        elif not services.port_open(self.rabbit.stomp_port):
            self.rabbit.start()
        return self.rabbit

    def private_cluster(self) -> services.PrivateCluster:
        """The private PostgreSQL cluster, running. :raises ClusterError:"""
        if self.cluster is None:
            cluster = services.PrivateCluster(self.args.workdir, self.args.pg_port)
            LOGGER.info("starting the private PostgreSQL cluster in %s (port %d)", cluster.datadir,
                        self.args.pg_port)
            self.cluster = cluster
            cluster.ensure()
        elif self.cluster.pid() is None:
            self.cluster.start()
        return self.cluster

    def stop(self) -> None:
        if self.rabbit is not None:
            try:
                self.rabbit.stop()
            except services.ServiceError as exc:
                LOGGER.warning("%s", exc)
        if self.cluster is not None:
            try:
                self.cluster.stop()
            except Exception as exc:  # noqa: BLE001 - ClusterError; at the end, only reported
                LOGGER.warning("%s", exc)


def run_one(scenario: str, flow: str, args: argparse.Namespace, rng: random.Random,
            private: Services) -> Result:
    broker: Broker = RABBITMQ
    node = None
    target1_server = None
    rabbit = cluster = None
    workdir = os.path.join(args.workdir, "runs")
    try:
        if scenario == "broker":
            rabbit = private.private_rabbit()
            broker = Broker("rabbitmq-chaos", "127.0.0.1", rabbit.stomp_port, "guest", "guest")
            node = rabbit.node
        if scenario == "target-pg":
            cluster = private.private_cluster()
            target1_server = cluster.dsn()
        run = FlowRun(scenario, flow, args.packets, args.rate, workdir, args.dsn, broker, rng,
                      target1_server=target1_server, node=node)
    except Exception as exc:  # noqa: BLE001 - reported as a failed stream, the others still run
        LOGGER.exception("%s / %s: set-up failed", scenario, flow)
        return Result(scenario, flow, problems=["set-up failed: %s" % exc])
    LOGGER.info("== %s / %s: destination %s, %d packets, daemon log %s", scenario, flow, run.name,
                args.packets, run.log_path)
    timeout = 600 + args.packets / 100.0
    check = None
    try:
        run.start_daemon()
        run.feeder.start()
        if scenario == "kill":
            scenarios.kill(run, args)
        elif scenario == "broker":
            scenarios.broker(run, args, rabbit)
        elif scenario == "target-pg":
            scenarios.target_pg(run, args, cluster)
        elif scenario == "stuck":
            scenarios.stuck(run, args)
        elif scenario == "sigterm":
            scenarios.sigterm(run, args)
        elif scenario == "reload":
            check = scenarios.reload(run, args, args.dsn)
    except Exception as exc:  # noqa: BLE001 - a failed scenario is reported with its figures
        LOGGER.exception("%s / %s failed", scenario, flow)
        run.result.problems.append("scenario failed: %s" % exc)
        run.feeder.pause(False)
        if run.pid is None:
            run.start_daemon()
        timeout = 300
    try:
        result = run.finish(timeout)
        if check is not None:
            check()
    except Exception as exc:  # noqa: BLE001
        LOGGER.exception("%s / %s: counting failed", scenario, flow)
        run.result.problems.append("counting failed: %s" % exc)
        result = run.result
    finally:
        run.cleanup(args.keep)
    result.duration = time.monotonic() - run.began
    return result


COLUMNS = ("scenario", "flow", "sent", "canonical", "target1", "target2", "dead-lettered", "lost",
           "double-applied", "restarts", "duration", "result")


def table(results: List[Result]) -> str:
    rows = [COLUMNS]
    for r in results:
        rows.append((r.scenario, r.flow, str(r.sent), str(r.applied.get("canonical", "-")),
                     str(r.applied.get("target1", "-")), str(r.applied.get("target2", "-")),
                     str(r.dead_lettered), str(r.lost), str(r.double), str(r.restarts),
                     "%.0fs" % r.duration, "PASS" if r.ok else "FAIL"))
    rows.append(("total", "", str(sum(r.sent for r in results)),
                 str(sum(r.applied.get("canonical", 0) for r in results)),
                 str(sum(r.applied.get("target1", 0) for r in results)),
                 str(sum(r.applied.get("target2", 0) for r in results)),
                 str(sum(r.dead_lettered for r in results)), str(sum(r.lost for r in results)),
                 str(sum(r.double for r in results)), str(sum(r.restarts for r in results)),
                 "%.0fs" % sum(r.duration for r in results),
                 "PASS" if all(r.ok for r in results) else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = []
    for index, row in enumerate(rows):
        if index == len(rows) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(cell.rjust(w) if cell[:1].isdigit() else cell.ljust(w)
                               for cell, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def describe(result: Result) -> str:
    lines = ["== %s / %s: %s in %.0fs" % (result.scenario, result.flow, "PASS" if result.ok else "FAIL",
                                          result.duration),
             "   sent %d; applied %s; dead-lettered %d; lost %d; double-applied %d; restarts survived %d"
             % (result.sent, ", ".join("%s %d" % item for item in result.applied.items()),
                result.dead_lettered, result.lost, result.double, result.restarts)]
    lines += ["   - " + note for note in result.notes]
    lines += ["   ! " + problem for problem in result.problems]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr),
                                  logging.FileHandler(os.path.join(args.workdir, "chaos.log"))])
    for noisy in ("golconde", "bench"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for noisy in ("stomp", "stomp.py"):          # "could not connect" while the broker is down
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    print("chaos: scenarios %s, flows %s, %d packets per stream at %s packets/s, seed %d"
          % (",".join(args.scenarios), ",".join(args.flows), args.packets,
             args.rate or "max", seed), flush=True)
    scratch = services.create_database(args.dsn, "golconde_chaos_selfcheck")
    try:
        checked = workload.self_check(scratch)
        print("chaos: counting self-check: an UPDATE applied twice and one lost are counted as"
              " double-applied %(double)d, lost %(lost)d" % checked, flush=True)
    finally:
        services.drop_database(scratch)
    private = Services(args)
    results: List[Result] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))   # clean up on TERM
    began = time.monotonic()
    try:
        for scenario in args.scenarios:
            for flow in args.flows:
                result = run_one(scenario, flow, args, rng, private)
                results.append(result)
                print(describe(result), flush=True)
    except (KeyboardInterrupt, SystemExit):
        print("chaos: interrupted", flush=True)
    finally:
        private.stop()
    print("\nchaos: figures (seed %d, %d packets per stream, %.0f s in all)" % (
        seed, args.packets, time.monotonic() - began))
    print(table(results), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"seed": seed, "packets": args.packets, "rate": args.rate,
                       "results": [r.as_dict() for r in results]}, handle, indent=2)
    return 0 if results and all(r.ok for r in results) and \
        len(results) == len(args.scenarios) * len(args.flows) else 1


if __name__ == "__main__":
    sys.exit(main())
