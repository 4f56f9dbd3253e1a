"""Where RabbitMQ spends its work, by role: ``python -m bench.rabbit_top``.

Run it beside a benchmark (in a second terminal, or in the background during
``bench.ledger``'s latency phase). It asks the local node, through
``rabbitmqctl eval``, for every Erlang process's reduction count, waits
``--seconds``, asks again, and groups the difference by role:

* ``channel <connection>``: a connection's channels (routing, confirms and
  deliveries happen here), under the name the client gave the connection
  (the daemon's are ``<daemon> publish`` and ``<daemon> consume``);
* ``connection <connection>``: its reader and writer (frame parsing and
  socket writes);
* ``queue <name>``: a queue's own process (a quorum queue's Raft server);
* the quorum log processes (``ra_log_wal`` and its siblings) and everything
  else by registered name or initial call.

Reductions are the Erlang VM's unit of work: not CPU time, but close to
proportional to it within one node and one workload. The node's CPU seconds
over the same window come from ``/proc``, so each role's share can be read as
CPU. Each ``rabbitmqctl`` call starts an Erlang VM of its own (about a
CPU-second): that happens outside the window, but on a 2-core machine it
slows whatever runs beside it for a moment.

Run: ``.venv/bin/python -m bench.rabbit_top [--seconds 5] [--top 20] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

from bench.harness import cpu_of, rabbitmq_pids

__all__ = ["Sample", "main", "sample"]

# One line per process: reductions over the window, role, label. Labels are
# printed with ~ts so connection names stay readable; tabs separate fields.
_SNIPPET = r"""
Label = fun(P, Queues) ->
  case maps:find(P, Queues) of
    {ok, Q} -> {"queue", Q};
    error ->
      case erlang:process_info(P, [registered_name, dictionary, initial_call]) of
        undefined -> {"gone", "exited during the window"};
        [{registered_name, N}, {dictionary, D}, {initial_call, IC}] ->
          case proplists:get_value(process_name, D) of
            {rabbit_channel, {Addr, _}} -> {"channel", Addr};
            {rabbit_writer, {Addr, _}} -> {"connection", Addr};
            {rabbit_reader, Name} -> {"connection", Name};
            _ when is_atom(N) -> {"process", atom_to_list(N)};
            _ ->
              {M, F, A} = case proplists:get_value('$initial_call', D) of
                undefined -> IC; Call -> Call end,
              {"process", io_lib:format("~p:~p/~p", [M, F, A])}
          end
      end
  end
end,
Reds = fun() -> maps:from_list([{P, R} || P <- processes(),
  {reductions, R} <- [erlang:process_info(P, reductions)]]) end,
Queues = maps:from_list(lists:flatmap(fun(Q) ->
  Name = element(4, amqqueue:get_name(Q)),
  case amqqueue:get_pid(Q) of
    {Reg, _Node} when is_atom(Reg) ->
      case whereis(Reg) of undefined -> []; Pid -> [{Pid, Name}] end;
    Pid when is_pid(Pid) -> [{Pid, Name}];
    _ -> []
  end end, rabbit_amqqueue:list())),
A = Reds(), timer:sleep(__MILLIS__), B = Reds(),
lists:foreach(fun({P, R}) ->
  Delta = R - maps:get(P, A, 0),
  case Delta > 0 of
    true ->
      {Role, Text} = Label(P, Queues),
      io:format("~b\t~s\t~ts~n", [Delta, Role, Text]);
    false -> ok
  end end, maps:to_list(B)),
ok.
"""


@dataclass(frozen=True, slots=True)
class Sample:
    """One window: reductions by ``role label`` and the node's CPU seconds."""

    seconds: float
    cpu_s: float
    reductions: dict[str, int]

    @property
    def total(self) -> int:
        """Reductions of every role together."""
        return sum(self.reductions.values())


def _connection_names(lines: list[tuple[int, str, str]]) -> dict[str, str]:
    """``"127.0.0.1:5000 -> 127.0.0.1:5672"`` → the client-provided name.

    A reader labels itself ``"<address> - <name>"`` when the client named the
    connection; channels and writers carry only the address.
    """
    names: dict[str, str] = {}
    for _, role, text in lines:
        address, sep, name = text.partition(" - ")
        if role == "connection" and sep:
            names[address] = name
    return names


def parse(output: str) -> dict[str, int]:
    """Group ``rabbitmqctl eval``'s lines into ``"role label" → reductions``."""
    lines: list[tuple[int, str, str]] = []
    for line in output.splitlines():
        parts = line.split("\t", 2)
        if len(parts) == 3 and parts[0].isdigit():
            lines.append((int(parts[0]), parts[1], parts[2]))
    names = _connection_names(lines)
    grouped: dict[str, int] = defaultdict(int)
    for reductions, role, text in lines:
        if role in ("channel", "connection"):
            address = text.partition(" - ")[0]
            text = names.get(address, address)
        elif role == "process" and text.startswith("ra_log"):
            role = "quorum log"
        grouped[f"{role} {text}"] += reductions
    return dict(grouped)


def sample(seconds: float) -> Sample:
    """Measure one window of *seconds* on the local node (blocking)."""
    pids = rabbitmq_pids()
    if not pids:
        raise SystemExit("rabbit_top: no RabbitMQ node (beam.smp) is running")
    snippet = _SNIPPET.replace("__MILLIS__", str(round(seconds * 1000)))
    started = time.monotonic()
    cpu_before = sum(cpu_of(pids).values())
    done = subprocess.run(
        ["rabbitmqctl", "eval", snippet], capture_output=True, text=True, check=False
    )
    cpu_after = sum(cpu_of(pids).values())
    if done.returncode != 0:
        raise SystemExit(f"rabbit_top: rabbitmqctl eval failed: {done.stderr.strip()}")
    elapsed = time.monotonic() - started
    # The CPU reading spans rabbitmqctl's start-up and exit as well as the
    # window; under a steady load, scaling it to the window's share of that
    # time gives the node's CPU over the window.
    cpu_s = (cpu_after - cpu_before) * min(1.0, seconds / elapsed)
    return Sample(seconds=seconds, cpu_s=cpu_s, reductions=parse(done.stdout))


def report(s: Sample, top: int) -> list[str]:
    """Human lines: the busiest roles with their share and estimated CPU."""
    total = s.total or 1
    lines = [
        f"RabbitMQ over {s.seconds:.1f} s: {s.total:,} reductions, "
        f"about {s.cpu_s:.2f} cpu-s",
        f"{'share':>6}  {'cpu-s':>6}  role",
    ]
    ranked = sorted(s.reductions.items(), key=lambda kv: kv[1], reverse=True)
    for label, reductions in ranked[:top]:
        share = reductions / total
        lines.append(f"{share:6.1%}  {share * s.cpu_s:6.2f}  {label}")
    rest = sum(r for _, r in ranked[top:])
    if rest:
        lines.append(f"{rest / total:6.1%}  {rest / total * s.cpu_s:6.2f}  (the rest)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rabbit_top", description=__doc__)
    p.add_argument("--seconds", type=float, default=5.0, help="window length")
    p.add_argument("--top", type=int, default=20, help="roles to list")
    p.add_argument("--json", action="store_true", help="one JSON object instead")
    args = p.parse_args(argv)
    s = sample(args.seconds)
    if args.json:
        print(
            json.dumps(
                {
                    "seconds": s.seconds,
                    "cpu_s": round(s.cpu_s, 3),
                    "reductions": dict(
                        sorted(s.reductions.items(), key=lambda kv: -kv[1])
                    ),
                }
            )
        )
    else:
        print("\n".join(report(s, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
