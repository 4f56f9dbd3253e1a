"""`bench.rabbit_top`'s grouping of a node's per-process reductions."""

from __future__ import annotations

from bench.rabbit_top import Sample, parse, report

ADDR = "127.0.0.1:50000 -> 127.0.0.1:5672"
OTHER = "127.0.0.1:50001 -> 127.0.0.1:5672"


def test_channels_writers_and_reader_group_under_the_client_given_name() -> None:
    output = "\n".join(
        [
            "Listing nothing ...",  # rabbitmqctl's chatter is skipped
            f"700\tchannel\t{ADDR}",
            f"300\tchannel\t{ADDR}",
            f"50\tconnection\t{ADDR} - q2c-1 publish",
            f"25\tconnection\t{ADDR}",
            f"90\tchannel\t{OTHER}",  # an unnamed connection keeps its address
            "400\tqueue\tq2c.wf.ledger.0",
            "200\tprocess\tra_log_wal",
            "10\tprocess\trabbit_disk_monitor",
            "ok",
        ]
    )

    assert parse(output) == {
        "channel q2c-1 publish": 1000,
        "connection q2c-1 publish": 75,
        f"channel {OTHER}": 90,
        "queue q2c.wf.ledger.0": 400,
        "quorum log ra_log_wal": 200,
        "process rabbit_disk_monitor": 10,
    }


def test_report_shares_the_node_cpu_by_reductions_and_folds_the_tail() -> None:
    s = Sample(
        seconds=5.0,
        cpu_s=2.0,
        reductions={"channel a": 600, "queue b": 300, "process c": 100},
    )

    lines = report(s, top=2)

    assert lines[0] == "RabbitMQ over 5.0 s: 1,000 reductions, about 2.00 cpu-s"
    assert lines[2].split() == ["60.0%", "1.20", "channel", "a"]
    assert lines[3].split() == ["30.0%", "0.60", "queue", "b"]
    assert lines[4].split() == ["10.0%", "0.20", "(the", "rest)"]
